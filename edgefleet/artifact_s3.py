"""Artifacts in an S3-compatible bucket (`EDGEFLEET_ARTIFACT_BACKEND=s3`): a NAS's MinIO, any S3.

Objects are named `<prefix>/<id[:2]>/<id>` (the id is the sha256 of the bytes), so an object
that exists is never written again. boto3 is imported when the backend is first used (the
`edgefleet[s3]` extra); credentials come from the environment as boto3 reads them
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, a profile, an instance role).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from edgefleet.settings import Settings

CHUNK = 1024 * 1024


class S3Unavailable(RuntimeError):
    """The backend cannot be used: boto3 missing, no bucket configured."""


@dataclass(frozen=True)
class S3Object:
    """An open object (or a range of it): its bytes as chunks, how many, and of how many in all."""

    chunks: Iterator[bytes]
    length: int
    total: int


class S3Blobs:
    def __init__(self, settings: Settings) -> None:
        if not settings.artifact_s3_bucket:
            raise S3Unavailable("EDGEFLEET_ARTIFACT_S3_BUCKET is not set")
        try:
            import boto3
        except ImportError:
            raise S3Unavailable("the s3 backend needs boto3: pip install 'edgefleet[s3]'") from None
        self.bucket = settings.artifact_s3_bucket
        self.prefix = settings.artifact_s3_prefix.strip("/")
        self._client: Any = boto3.client(
            "s3", endpoint_url=settings.artifact_s3_endpoint_url, region_name=settings.artifact_s3_region
        )

    def key(self, artifact_id: str) -> str:
        return f"{self.prefix}/{artifact_id[:2]}/{artifact_id}" if self.prefix else f"{artifact_id[:2]}/{artifact_id}"

    def size(self, artifact_id: str) -> int | None:
        """The stored object's size; None when there is none."""
        from botocore.exceptions import ClientError

        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self.key(artifact_id))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return int(head["ContentLength"])

    def put_file(self, artifact_id: str, path: Path) -> None:
        self._client.upload_file(str(path), self.bucket, self.key(artifact_id))

    def open(self, artifact_id: str, first: int | None = None, last: int | None = None) -> S3Object:
        """The object, or bytes first..last (inclusive) of it."""
        extra = {"Range": f"bytes={first}-{'' if last is None else last}"} if first is not None else {}
        answer = self._client.get_object(Bucket=self.bucket, Key=self.key(artifact_id), **extra)
        length = int(answer["ContentLength"])
        total = length
        content_range = answer.get("ContentRange")  # "bytes 0-9/100"
        if content_range and "/" in content_range:
            total = int(content_range.rsplit("/", 1)[1])
        return S3Object(chunks=answer["Body"].iter_chunks(CHUNK), length=length, total=total)

    def download(self, artifact_id: str, out: BinaryIO) -> None:
        for chunk in self.open(artifact_id).chunks:
            out.write(chunk)
