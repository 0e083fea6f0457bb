"""The router's side of artifacts: where the bytes go, how an upload is received, who may call.

Backends (`EDGEFLEET_ARTIFACT_BACKEND`):
- `router` (default): `<data_dir>/artifacts/<id[:2]>/<id>`; nodes upload to and fetch from the
  router's API (`POST /v1/node-artifacts`: named by the router's hash of what arrived, or `PUT`
  by id; `GET /v1/artifacts/{id}`);
- `s3`: the bucket (edgefleet.artifact_s3); nodes reach it themselves, the router uses it for
  client uploads and downloads.

An upload is streamed into `<data_dir>/artifacts/.tmp/` while it is hashed and counted; only a
complete upload within the size limit is moved (or copied to S3) under its id, so a refused or
broken one leaves nothing behind under an id.
"""

from __future__ import annotations

import logging
import os
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter

from edgefleet import metric_names
from edgefleet.artifact_files import NODE_CREDENTIAL_PREFIX, node_of_credential
from edgefleet.artifact_s3 import S3Blobs
from edgefleet.settings import Settings
from edgefleet.store import JobStore

log = logging.getLogger(__name__)

MIB = 1024 * 1024


class UploadTooLarge(Exception):
    pass


@dataclass(frozen=True)
class Received:
    """A complete upload, hashed, in a temporary file the caller must store or remove."""

    id: str
    size: int
    path: Path


class ArtifactService:
    def __init__(self, settings: Settings, store: JobStore, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.store = store
        self.backend = settings.artifact_backend
        self.root = settings.data_dir / "artifacts"
        self.staging = self.root / ".tmp"
        self.max_file_bytes = int(settings.artifact_max_file_mb * MIB)
        self._s3: S3Blobs | None = None
        self.downloads = Counter(
            metric_names.ARTIFACT_DOWNLOADS,
            "artifact downloads the router served",
            ["by"],
            registry=registry,
        )
        self.uploads = Counter(
            metric_names.ARTIFACT_UPLOADS, "artifact uploads the router stored", ["by"], registry=registry
        )
        self.bytes_out = Counter(metric_names.ARTIFACT_BYTES_SENT, "artifact bytes served", registry=registry)

    # --- the bytes -------------------------------------------------------------------------

    @property
    def s3(self) -> S3Blobs:
        if self._s3 is None:
            self._s3 = S3Blobs(self.settings)
        return self._s3

    def disk_path(self, artifact_id: str) -> Path:
        return self.root / artifact_id[:2] / artifact_id

    def stored_size(self, artifact_id: str) -> int | None:
        """Size of the stored blob; None when the backend does not have it."""
        if self.backend == "s3":
            return self.s3.size(artifact_id)
        try:
            return self.disk_path(artifact_id).stat().st_size
        except FileNotFoundError:
            return None

    def store_received(self, received: Received) -> None:
        """Put a complete upload under its id (a blob already there is kept: same id, same bytes)."""
        try:
            if self.stored_size(received.id) == received.size:
                return
            if self.backend == "s3":
                self.s3.put_file(received.id, received.path)
                return
            target = self.disk_path(received.id)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(received.path, 0o444)
            os.replace(received.path, target)  # atomic: a reader sees all of it or nothing
        finally:
            received.path.unlink(missing_ok=True)

    async def receive(self, request: Request) -> Received:
        """The body streamed into a staging file, hashed; UploadTooLarge over the per-file limit."""
        import hashlib

        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_file_bytes:
            raise UploadTooLarge()
        self.staging.mkdir(parents=True, exist_ok=True)
        path = self.staging / uuid.uuid4().hex
        digest = hashlib.sha256()
        size = 0
        try:
            with open(path, "wb") as out:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_file_bytes:
                        raise UploadTooLarge()
                    digest.update(chunk)
                    out.write(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return Received(id=digest.hexdigest(), size=size, path=path)

    @staticmethod
    def tree_problem(path: Path) -> str | None:
        """Why an upload said to be a folder is not a tar of plain files and folders, or None."""
        try:
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    if not (member.isfile() or member.isdir()):
                        return f"{member.name!r} is neither a file nor a folder"
                    name = member.name
                    if name.startswith("/") or ".." in name.split("/"):
                        return f"{name!r} would land outside the folder"
        except tarfile.TarError as exc:
            return f"not a tar archive: {exc}"
        return None

    # --- who calls -------------------------------------------------------------------------

    def node_of(self, token: str) -> str | None:
        """The live node a node credential names, or None (wrong, or the node is not live)."""
        if not token.startswith(NODE_CREDENTIAL_PREFIX):
            return None
        # Read each time (one GET): a rotated secret refuses old credentials at once.
        node = node_of_credential(self.store.artifacts.node_secret(), token)
        if node is None or not self.store.artifacts.node_is_live(node):
            return None
        return node
