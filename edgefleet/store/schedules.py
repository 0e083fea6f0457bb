"""Schedules in Redis: the schedule records, which are due, their claimed fire times and their runs.

A store class on the job store's connection (`ScheduleStore.of(store)`). Times are integer
milliseconds since the epoch, so that a fire time is one exact string in keys, records and
the job's idempotency key. Every change is one script (`lua/schedule_*.lua`): claiming a fire
time compares and moves the schedule's `next_at` atomically, so each fire time is claimed
once whatever the number of routers and whenever one dies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from edgefleet.store.connection import StoreConnection
from edgefleet.store.jobs import JobStore

ClaimVerdict = Literal["fire", "overlap", "skip", "moved", "paused", "gone"]
PENDING_SEP = "|"  # schedule ids are hex: never in an id


@dataclass(frozen=True)
class StoredSchedule:
    """One schedule as Redis holds it; `spec` is the ScheduleRequest JSON it was made from."""

    id: str
    tenant: str
    spec: str
    state: str
    next_at: int
    created_at: float
    updated_at: float
    fired: int
    skipped: int
    last_job: str | None


@dataclass(frozen=True)
class Claim:
    verdict: ClaimVerdict
    next_at: int | None  # the schedule's next_at after the call (moved: the one another claim set)


def _schedule(raw: dict[str, str]) -> StoredSchedule:
    return StoredSchedule(
        id=raw["id"],
        tenant=raw["tenant"],
        spec=raw["spec"],
        state=raw["state"],
        next_at=int(raw["next_at"]),
        created_at=float(raw["created_at"]),
        updated_at=float(raw["updated_at"]),
        fired=int(raw.get("fired") or 0),
        skipped=int(raw.get("skipped") or 0),
        last_job=raw.get("last_job") or None,
    )


class ScheduleStore:
    def __init__(self, connection: StoreConnection) -> None:
        self._conn = connection
        self._redis = connection.client
        self._keys = connection.keys

    @classmethod
    def of(cls, store: JobStore) -> ScheduleStore:
        return cls(store.connection)

    def now_ms(self) -> int:
        """Redis' clock, as every router sees the same one."""
        seconds, micros = self._redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def create(
        self,
        schedule_id: str,
        tenant: str,
        spec: str,
        next_at: int,
        due_at: int,
        paused: bool,
        max_per_tenant: int,
        overlap: str = "allow",
    ) -> Literal["created", "full", "exists"]:
        """`overlap` (skip or allow) is the spec's, kept beside it for the claim script to read."""
        fields = {"spec": spec, "state": "paused" if paused else "active", "next_at": str(next_at), "overlap": overlap}
        verdict = self._conn.run(
            "schedule_create",
            schedule_id,
            tenant,
            json.dumps(fields),
            max_per_tenant,
            "" if paused else due_at,
        )
        return verdict  # type: ignore[no-any-return]

    def get(self, schedule_id: str) -> StoredSchedule | None:
        raw = self._redis.hgetall(self._keys.key("schedule", schedule_id=schedule_id))
        return _schedule(raw) if raw.get("spec") else None

    def ids(self, tenant: str | None, limit: int) -> list[str]:
        """Schedule ids, newest first: all of them, or one tenant's."""
        index = self._keys.key("schedules") if tenant is None else self._keys.key("tenant_schedules", tenant=tenant)
        ids: list[str] = self._redis.zrevrange(index, 0, limit - 1)
        return ids

    def due(self, now_ms: int, limit: int = 100) -> list[str]:
        """Active schedules whose next fire time is due (its jitter included)."""
        ids: list[str] = self._redis.zrangebyscore(self._keys.key("schedules_due"), "-inf", now_ms, start=0, num=limit)
        return ids

    def pending(self, limit: int = 100) -> list[tuple[str, int]]:
        """Claimed fire times whose job is not recorded yet (a router died, or its create failed), oldest first."""
        members: list[str] = self._redis.zrange(self._keys.key("schedules_pending"), 0, limit - 1)
        out = []
        for member in members:
            schedule_id, _, fire = member.partition(PENDING_SEP)
            out.append((schedule_id, int(fire)))
        return out

    def claim_fire(
        self, schedule_id: str, expected: int, fire_at: int, reason: str, next_at: int, due_at: int, keep: int
    ) -> Claim:
        """Claim `fire_at` (a job is to be made for it) if the schedule's next_at is still `expected`."""
        return self._claim(schedule_id, expected, "fire", fire_at, fire_at, 1, reason, next_at, due_at, keep)

    def skip_missed(
        self, schedule_id: str, expected: int, first: int, last: int, count: int, next_at: int, due_at: int, keep: int
    ) -> Claim:
        """Record `count` missed fire times (`first`..`last`) as skipped if next_at is still `expected`."""
        return self._claim(schedule_id, expected, "skip", first, last, count, "missed", next_at, due_at, keep)

    def _claim(
        self,
        schedule_id: str,
        expected: int,
        op: str,
        fire: int,
        until: int,
        count: int,
        reason: str,
        next_at: int,
        due_at: int,
        keep: int,
    ) -> Claim:
        verdict, current = self._conn.run(
            "schedule_claim",
            schedule_id,
            str(expected),
            op,
            str(fire),
            str(until),
            count,
            reason,
            str(next_at),
            due_at,
            keep,
        )
        return Claim(verdict, int(current) if current else None)

    def record(self, schedule_id: str, fire_at: int, job_id: str | None, error: str | None = None) -> bool:
        """What a claimed fire time came to; False when the schedule was deleted meanwhile."""
        state = "created" if job_id else "failed"
        answer = self._conn.run("schedule_record", schedule_id, str(fire_at), state, job_id or "", error or "")
        return bool(answer == "recorded")

    def pause(self, schedule_id: str) -> bool:
        return bool(self._conn.run("schedule_state", schedule_id, "pause", "", "") != "gone")

    def resume(self, schedule_id: str, next_at: int, due_at: int) -> bool:
        """Active again from `next_at` on (a schedule already active keeps its own next fire time)."""
        return bool(self._conn.run("schedule_state", schedule_id, "resume", str(next_at), due_at) != "gone")

    def delete(self, schedule_id: str) -> bool:
        return bool(self._conn.run("schedule_delete", schedule_id))

    def runs(self, schedule_id: str, limit: int) -> list[dict[str, Any]]:
        """The last `limit` run records, newest first (times in ms, as strings)."""
        fires: list[str] = self._redis.zrevrange(self._keys.key("schedule_runs", schedule_id=schedule_id), 0, limit - 1)
        if not fires:
            return []
        raw = self._redis.hmget(self._keys.key("schedule_run", schedule_id=schedule_id), fires)
        return [json.loads(item) for item in raw if item]
