"""Artifacts in the job store: which files (by sha256) a job's steps produced, who holds a copy,
which tenants may use which ids, and the secret nodes derive their artifact credentials from.

The bytes live elsewhere (the router's data dir or an S3 bucket); Redis keeps:
- `artifact:<id>` (hash): size, kind, first name and node, created_at, once per blob;
- `artifact:<id>:holders` (set): nodes with a local copy, for locality at release;
- `artifacts:job:<job>` (hash): subtask id -> JSON list of the artifacts it produced, written
  by `lua/artifacts_record.lua` before the attempt reports success, deleted with the job;
- `artifacts:tenant:<tenant>` (sorted set): ids the tenant uploaded or its jobs produced.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from edgefleet.schemas import ArtifactInfo, SubtaskEnvelope
from edgefleet.store.connection import StoreConnection

RecordVerdict = Literal["ok", "stale", "too_large"]


@dataclass(frozen=True)
class Recorded:
    verdict: RecordVerdict
    job_bytes: int  # the job's artifact bytes with these (what was compared with the limit)


class ArtifactStore:
    def __init__(self, connection: StoreConnection) -> None:
        self._conn = connection

    # --- what steps produced --------------------------------------------------------------

    def record_outputs(
        self,
        env: SubtaskEnvelope,
        *,
        node: str,
        pid: int,
        artifacts: Sequence[ArtifactInfo],
        max_job_bytes: int,
    ) -> Recorded:
        """Record an attempt's artifacts, only while it owns the subtask and within the job's limit."""
        records = json.dumps([a.model_dump(mode="json") for a in artifacts])
        verdict, total = self._conn.run(
            "artifacts_record", env.job_id, env.subtask_id, env.attempt, node, pid, records, max_job_bytes
        )
        return Recorded(verdict=verdict, job_bytes=int(total))

    def of_job(self, job_id: str, order: Sequence[str] | None = None) -> list[ArtifactInfo]:
        """Every artifact the job's steps produced, in step order (`order`, else by step id)."""
        raw: dict[str, str] = self._conn.client.hgetall(self._conn.keys.key("job_artifacts", job_id=job_id))
        steps = [s for s in order if s in raw] if order is not None else sorted(raw)
        return [ArtifactInfo.model_validate(item) for step in steps for item in json.loads(raw[step])]

    def of_steps(self, job_id: str, steps: Iterable[str]) -> dict[str, list[ArtifactInfo]]:
        """The artifacts of these steps of the job (a step without any is absent)."""
        wanted = list(dict.fromkeys(steps))
        if not wanted:
            return {}
        values = self._conn.client.hmget(self._conn.keys.key("job_artifacts", job_id=job_id), wanted)
        return {
            step: [ArtifactInfo.model_validate(item) for item in json.loads(value)]
            for step, value in zip(wanted, values, strict=True)
            if value
        }

    def job_bytes(self, job_id: str, except_subtask: str | None = None) -> int:
        raw: dict[str, str] = self._conn.client.hgetall(self._conn.keys.key("job_artifacts", job_id=job_id))
        return sum(
            int(item["size"]) for step, value in raw.items() if step != except_subtask for item in json.loads(value)
        )

    # --- blobs and who may use them ---------------------------------------------------------

    def register_upload(self, tenant: str, info: ArtifactInfo) -> None:
        """A client's upload: the blob's record (first writer wins) and the tenant's right to use it."""
        keys = self._conn.keys
        key = keys.key("artifact", artifact_id=info.id)
        pipe = self._conn.client.pipeline(transaction=True)
        pipe.hsetnx(key, "size", info.size)
        pipe.hsetnx(key, "kind", info.kind)
        pipe.hsetnx(key, "name", info.name)
        pipe.hsetnx(key, "created_at", info.created_at or 0)
        pipe.zadd(keys.key("tenant_artifacts", tenant=tenant), {info.id: info.created_at or 0})
        pipe.execute()

    def get(self, artifact_id: str) -> ArtifactInfo | None:
        """The blob's record (the name and node of its first appearance); None if never stored."""
        raw = self._conn.client.hgetall(self._conn.keys.key("artifact", artifact_id=artifact_id))
        if not raw:
            return None
        return ArtifactInfo(
            id=artifact_id,
            name=raw.get("name") or artifact_id,
            size=int(raw.get("size") or 0),
            kind="tree" if raw.get("kind") == "tree" else "file",
            node=raw.get("node") or None,
            created_at=float(raw["created_at"]) if raw.get("created_at") else None,
        )

    def visible(self, tenant: str, artifact_ids: Sequence[str]) -> set[str]:
        """Of these ids, those the tenant uploaded or its jobs produced."""
        if not artifact_ids:
            return set()
        key = self._conn.keys.key("tenant_artifacts", tenant=tenant)
        pipe = self._conn.client.pipeline(transaction=False)
        for artifact_id in artifact_ids:
            pipe.zscore(key, artifact_id)
        return {a for a, score in zip(artifact_ids, pipe.execute(), strict=True) if score is not None}

    # --- locality ------------------------------------------------------------------------

    def add_holder(self, artifact_id: str, node: str) -> None:
        pipe = self._conn.client.pipeline(transaction=False)
        pipe.sadd(self._conn.keys.key("artifact_holders", artifact_id=artifact_id), node)
        pipe.execute()

    def remove_holder(self, artifact_id: str, node: str) -> None:
        self._conn.client.srem(self._conn.keys.key("artifact_holders", artifact_id=artifact_id), node)

    def holders(self, artifact_id: str) -> set[str]:
        return set(self._conn.client.smembers(self._conn.keys.key("artifact_holders", artifact_id=artifact_id)))

    def input_bytes_by_node(self, subtasks: Sequence[tuple[str, str]]) -> list[dict[str, int]]:
        """For each (job id, subtask id): bytes of its input artifacts each node holds, in one
        round trip for a whole release batch (see lua/artifacts_locality.lua)."""
        if not subtasks:
            return []
        answers = self._conn.run("artifacts_locality", *(part for pair in subtasks for part in pair))
        return [{flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)} for flat in answers]

    # --- node credentials ----------------------------------------------------------------

    def node_is_live(self, node: str) -> bool:
        """Whether the node's heartbeat is current (a node credential is honoured only then)."""
        return self._conn.client.get(self._conn.keys.node(node)) is not None

    def node_secret(self) -> str:
        """The cluster's secret for node artifact credentials, made on first use (SET NX: all agree)."""
        key = self._conn.keys.key("artifact_secret")
        current = self._conn.client.get(key)
        if current:
            return current
        pipe = self._conn.client.pipeline(transaction=False)
        pipe.set(key, secrets.token_hex(32), nx=True)
        pipe.execute()
        return self._conn.client.get(key) or ""

    def rotate_node_secret(self) -> None:
        """A new secret: every node credential made before is refused (nodes make new ones on a
        401). For when a box that knew the old one is revoked."""
        pipe = self._conn.client.pipeline(transaction=False)
        pipe.set(self._conn.keys.key("artifact_secret"), secrets.token_hex(32))
        pipe.execute()
