"""Attempts: a worker owns a delivered subtask, renews its lease, checkpoints and ends it.

Every call is one Lua script (`lua/claim.lua`, `renew.lua`, ...), so an attempt that lost
its ownership (reaped, taken over) is refused, never half-applied.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from edgefleet.schemas import ResourceClass, SubtaskEnvelope
from edgefleet.store.connection import StoreConnection

Outcome = Literal["succeeded", "failed", "cancelled"]

# Seconds an expired lease is still honoured before its subtask may go to another attempt (the
# reaper, or a delivery taking the lease over): room for the owning box to have stopped its copy
# first (workers/lease_fence.py gives up 2 renew intervals before the lease ends; this grace
# adds to that margin and covers how far the boxes' clocks may run apart in rate).
LEASE_GRACE = 1.0


@dataclass(frozen=True)
class Claim:
    """What a worker learns when it tries to own a delivered subtask."""

    verdict: Literal["run", "drop", "owned"]
    reason: str = ""
    args: dict[str, Any] | None = None
    needs_outputs: dict[str, Any] | None = None
    owner_pid: int | None = None
    checkpoint: Any = None
    tenant: str = ""  # the job's tenant: sandbox executors are never shared across tenants
    queued_at: float | None = None  # when the attempt was released (the queue-wait metric)
    started_at: float | None = None  # when it was claimed


@dataclass(frozen=True)
class Claimant:
    """Who claims: a worker process of a node, with its lease and claim token (one per delivery)."""

    node: str
    pid: int
    lease_ttl: float
    max_lost: int
    token: str
    # > 0: the slot chains, and takes its next subtask itself if this one ends within so many seconds
    takes_for: float = 0.0


def parse_claim(result: Sequence[Any]) -> Claim:
    """A claim's answer (claim_core.lua's `claim_attempt`), from CLAIM or TAKE."""
    verdict = result[0]
    if verdict == "run":
        outputs = {k: json.loads(v) for k, v in json.loads(result[2]).items()} if result[2] != "{}" else {}
        checkpoint = json.loads(result[3]) if result[3] else None
        tenant = result[4] if len(result) > 4 else ""
        queued_at, started_at = (result[5], result[6]) if len(result) > 6 else ("", "")
        return Claim(
            "run",
            args=json.loads(result[1]),
            needs_outputs=outputs,
            checkpoint=checkpoint,
            tenant=tenant,
            queued_at=float(queued_at) if queued_at else None,
            started_at=float(started_at) if started_at else None,
        )
    if verdict == "owned":
        return Claim("owned", owner_pid=int(result[1]) if result[1] else None)
    return Claim("drop", reason=result[1])


@dataclass(frozen=True)
class Usage:
    """What one attempt used, and how it was isolated: informative, not a state transition."""

    isolation: str
    cpu_seconds: float
    max_rss_mb: float


@dataclass(frozen=True)
class Completion:
    accepted: bool
    job_state: str
    ready_classes: list[ResourceClass]


def completion_argv(
    env: SubtaskEnvelope,
    *,
    node: str,
    pid: int,
    outcome: Outcome,
    output: Any = None,
    error: str = "",
    retryable: bool = True,
    usage: Usage | None = None,
) -> list[Any]:
    """COMPLETE's arguments (complete_core.lua's `complete_attempt`), also COMPLETE_TAKE's first ten."""
    return [
        env.job_id,
        env.subtask_id,
        env.attempt,
        node,
        pid,
        outcome,
        json.dumps(output),
        error,
        "1" if retryable else "0",
        json.dumps(asdict(usage)) if usage else "",
    ]


def parse_completion(result: Sequence[Any]) -> Completion:
    """`complete_attempt`'s answer, from COMPLETE or COMPLETE_TAKE."""
    if result[0] == "stale":
        return Completion(accepted=False, job_state=result[1], ready_classes=[])
    ready = [ResourceClass(c) for c in result[2].split(",") if c]
    return Completion(accepted=True, job_state=result[1], ready_classes=ready)


@dataclass(frozen=True)
class Lost:
    """What became of an attempt reported lost: requeued, cancelled, failed, or stale."""

    verdict: str
    ready_classes: list[ResourceClass]


@dataclass(frozen=True)
class Renewal:
    still_owner: bool
    job_state: str


class AttemptStore:
    def __init__(self, connection: StoreConnection) -> None:
        self._conn = connection

    def claim(
        self,
        env: SubtaskEnvelope,
        *,
        node: str,
        pid: int,
        lease_ttl: float,
        dead_pid: int | None = None,
        max_lost: int = 5,
        token: str = "",
        takes_for: float = 0.0,
    ) -> Claim:
        """Own a delivered attempt. `token` names this delivery: the same claim sent again
        (its first reply lost to a connection error) is answered "run" again, not "owned".
        `takes_for`: as `Claimant.takes_for` (the slot counts as one of its class's takers)."""
        result = self._conn.run(
            "claim",
            env.job_id,
            env.subtask_id,
            env.attempt,
            node,
            pid,
            lease_ttl,
            dead_pid if dead_pid is not None else "",
            max_lost,
            token,
            LEASE_GRACE,
            takes_for,
        )
        return parse_claim(result)

    def renew(
        self,
        env: SubtaskEnvelope,
        *,
        node: str,
        pid: int,
        lease_ttl: float,
        progress: tuple[float, str] | None = None,
    ) -> Renewal:
        fraction, message = progress if progress else ("", "")
        result = self._conn.run(
            "renew", env.job_id, env.subtask_id, env.attempt, node, pid, lease_ttl, fraction, message
        )
        return Renewal(still_owner=result[0] == "ok", job_state=result[1])

    def save_checkpoint(self, env: SubtaskEnvelope, *, node: str, pid: int, state: Any) -> bool:
        """Store a running attempt's checkpoint; refused (False) if the attempt lost ownership."""
        return bool(self._conn.run("checkpoint", env.job_id, env.subtask_id, env.attempt, node, pid, json.dumps(state)))

    def complete(
        self,
        env: SubtaskEnvelope,
        *,
        node: str,
        pid: int,
        outcome: Outcome,
        output: Any = None,
        error: str = "",
        retryable: bool = True,
        usage: Usage | None = None,
    ) -> Completion:
        """Record an attempt's end (and what it used). A stale attempt (reaped, taken over) is not accepted."""
        argv = completion_argv(
            env, node=node, pid=pid, outcome=outcome, output=output, error=error, retryable=retryable, usage=usage
        )
        return self.complete_argv(argv)

    def complete_argv(self, argv: Sequence[Any]) -> Completion:
        """`complete` with its arguments made by `completion_argv`."""
        return parse_completion(self._conn.run("complete", *argv))

    def lost(self, env: SubtaskEnvelope, *, node: str, pid: int, max_lost: int, why: str) -> Lost:
        """The attempt's plugin process was killed by something outside it: a new attempt
        (resuming from its checkpoint) whatever its retries, until it is lost `max_lost` times."""
        verdict, detail = self._conn.run("lost", env.job_id, env.subtask_id, env.attempt, node, pid, max_lost, why)
        ready = [ResourceClass(detail)] if verdict == "requeued" else []
        return Lost(verdict=verdict, ready_classes=ready)

    def lose_processes(self, node: str, pids: list[int], max_lost: int) -> list[ResourceClass]:
        """Processes of `node` that died: their running attempts are lost now (requeued, or
        failed past `max_lost`), not when their leases expire. Returns the classes with work ready."""
        if not pids:
            return []
        raw = self._conn.run("lose_processes", node, json.dumps([str(p) for p in pids]), max_lost)
        return [ResourceClass(c) for c in raw or []]

    def reap(self, *, max_lost: int, dispatch_grace: float, stranded_after: float, batch: int = 200) -> int:
        """New attempts for expired leases, releases that died before the send, and stranded messages."""
        return int(self._conn.run("reap", max_lost, dispatch_grace, batch, stranded_after, LEASE_GRACE))

    def promote_delayed(self, max_count: int = 500) -> int:
        """Retries whose backoff is over become ready again."""
        return int(self._conn.run("promote_delayed", max_count))

    def running_count(self) -> int:
        """Subtasks holding a lease."""
        return int(self._conn.client.zcard(self._conn.keys.running))
