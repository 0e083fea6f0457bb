"""The release scheduler's state in the job store: backlogs, release, weights, target depths, the lease.

A store class of its own on the job store's connection (`SchedulerState.of(store)`): the
scripts are `lua/release.lua`, `dispatched.lua`, `backlog_counts.lua`, `set_weights.lua`,
`seed_weights.lua`, `set_target_depth.lua`, `lead.lua` and `resign.lua`; the score every
backlog is ordered by is `lua/score.lua`. Key names: `edgefleet.keys` (weights,
target_depth, changes (newest first, 20 kept), leader, loop_released, feedback, backlog...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet.scheduling import priority
from edgefleet.schemas import PriorityClass, ResourceClass, SubtaskEnvelope
from edgefleet.store import JobStore
from edgefleet.store.attempts import LEASE_GRACE, Claim, Claimant, Completion, parse_claim, parse_completion
from edgefleet.store.connection import StoreConnection


@dataclass(frozen=True)
class Released:
    envelope: SubtaskEnvelope
    queue: str
    # Whether the subtask reads input artifacts (locality looks up where they are only then).
    has_inputs: bool = True

    @property
    def dispatch_member(self) -> str:
        env = self.envelope
        return f"{env.job_id}|{env.subtask_id}|{env.attempt}"


def _released(item: dict[str, Any]) -> Released:
    """A released subtask as the release scripts describe it."""
    return Released(
        envelope=SubtaskEnvelope(
            job_id=item["job_id"],
            subtask_id=item["subtask_id"],
            attempt=item["attempt"],
            plugin=item["plugin"],
            action=item["action"],
            resource_class=ResourceClass(item["resource_class"]),
            timeout=item["timeout"],
            priority=PriorityClass(item["priority"]),
        ),
        queue=item["queue"],
        has_inputs=bool(item.get("inputs", True)),
    )


def _take_argv(resource_class: ResourceClass, claimant: Claimant, placed_plugins: Sequence[str]) -> list[Any]:
    """TAKE's arguments (take_core.lua's `take_next`), also COMPLETE_TAKE's last nine."""
    return [
        resource_class.value,
        claimant.node,
        claimant.pid,
        claimant.lease_ttl,
        claimant.max_lost,
        claimant.token,
        LEASE_GRACE,
        json.dumps(sorted(placed_plugins)),
        claimant.takes_for,
    ]


def _taken(answer: dict[str, Any]) -> tuple[Released, Claim | None]:
    claim = answer.get("claim")
    return _released(answer["item"]), (parse_claim(claim) if claim else None)


class SchedulerState:
    def __init__(self, connection: StoreConnection) -> None:
        self._conn = connection
        self._redis = connection.client
        self._keys = connection.keys

    @classmethod
    def of(cls, store: JobStore) -> SchedulerState:
        """The scheduler's state on `store`'s connection."""
        return cls(store.connection)

    # --- release to the broker ----------------------------------------------------------

    def release(self, resource_class: ResourceClass, max_count: int, target_depth: int) -> list[Released]:
        """Pop up to `max_count` of the class's lowest scores while its queue is under the
        target depth (Redis' value wins over `target_depth`), marked as being dispatched."""
        raw = self._conn.run("release", resource_class.value, max_count, target_depth)
        items = json.loads(raw) if raw and raw != "{}" else []
        return [_released(item) for item in items]

    def take(
        self, resource_class: ResourceClass, claimant: Claimant, placed_plugins: Sequence[str] = ()
    ) -> tuple[Released, Claim | None] | None:
        """The class's next ready subtask for a slot that is free now, in the release order but
        past the target depth (it never waits in a queue), claimed for `claimant` in the same
        call unless it reads input artifacts, is pinned to another node or its plugin is in
        `placed_plugins` (then the caller places it, and claims it if it stays). None when
        nothing is ready."""
        raw = self._conn.run("take", *_take_argv(resource_class, claimant, placed_plugins))
        return _taken(json.loads(raw)) if raw else None

    def complete_and_take(
        self,
        completion: Sequence[Any],
        resource_class: ResourceClass,
        claimant: Claimant,
        placed_plugins: Sequence[str] = (),
    ) -> tuple[Completion, tuple[Released, Claim | None] | None]:
        """An attempt's end (`completion`: `completion_argv`'s list) and, once it is recorded, what
        `take` would answer, in one call: a slot that chains reaches its next subtask without a
        round trip of its own. Nothing is taken for a stale attempt."""
        answer = json.loads(
            self._conn.run("complete_take", *completion, *_take_argv(resource_class, claimant, placed_plugins))
        )
        taken = answer.get("taken")
        return parse_completion(answer["done"]), (_taken(taken) if taken else None)

    def wait_for_work(self, resource_class: ResourceClass, timeout: float) -> bool:
        """Block until a subtask of the class is made ready while this slot lingers (a take that
        found nothing registered it, see take_core.lua), or `timeout` seconds pass; whether woken."""
        return self._redis.blpop([self._keys.wake(resource_class)], timeout=timeout) is not None

    def set_queue(self, env: SubtaskEnvelope, queue: str, placement: str | None = None) -> None:
        """The queue a released subtask was actually sent to (the reaper looks there), and why."""
        fields = {"queue": queue} if placement is None else {"queue": queue, "placement": placement}
        self._redis.hset(self._keys.subtask(env.job_id, env.subtask_id), mapping=fields)

    def mark_dispatched(self, released: list[Released]) -> None:
        if released:
            self._conn.run("dispatched", *[r.dispatch_member for r in released])

    # --- backlogs -------------------------------------------------------------------------

    def backlog_size(self, resource_class: ResourceClass) -> int:
        return int(self._redis.zcard(self._keys.backlog(resource_class)))

    def backlog_counts(self) -> dict[ResourceClass, dict[str, int]]:
        """Ready subtasks per resource class and priority class of their job, in one atomic read.

        Every priority class is present (0 when none wait); a class whose stored counts do not
        add up to its backlog is recounted first (see `lua/backlog_counts.lua`)."""
        raw = json.loads(self._conn.run("backlog_counts", json.dumps([rc.value for rc in ResourceClass])))
        out: dict[ResourceClass, dict[str, int]] = {}
        for rc in ResourceClass:
            counts = (raw.get(rc.value) or {}).get("counts") or {}
            row = {p.value: 0 for p in PriorityClass}
            for name, n in counts.items():
                row[name] = int(n)
            out[rc] = row
        return out

    def backlog_order(self, resource_class: ResourceClass, limit: int = 100) -> list[tuple[str, float]]:
        """The first `limit` backlog members ("job|subtask") with their scores, next first."""
        rows: list[tuple[str, float]] = self._redis.zrange(
            self._keys.backlog(resource_class), 0, limit - 1, withscores=True
        )
        return rows

    def queued_size(self, resource_class: ResourceClass) -> int:
        """Released subtasks of the class that no worker has claimed yet."""
        return int(self._redis.zcard(self._keys.queued(resource_class)))

    def tenant_active(self, tenant: str) -> int:
        """The tenant's subtasks that are ready, queued, running or waiting for a retry (its fairness load)."""
        return int(self._redis.get(self._keys.tenant_active(tenant)) or 0)

    # --- weights and target depths ----------------------------------------------------------

    def seed_weights(self, defaults: Mapping[str, float]) -> int:
        """Fill in the weights Redis does not have yet; values already there win."""
        return int(self._conn.run("seed_weights", json.dumps(priority.validate_weights(defaults))))

    def weights(self) -> dict[str, float]:
        stored: dict[str, str] = self._redis.hgetall(self._keys.key("weights"))
        out = dict(priority.DEFAULT_WEIGHTS)
        for name, value in stored.items():
            try:
                out[name] = float(value)
            except ValueError:
                continue
        return out

    def set_weights(self, changes: Mapping[str, float], reason: str) -> int:
        """Change some weights, log the change with its reason, and rescore every waiting
        subtask with the new weights, all in one atomic step. Returns the rescored count."""
        valid = priority.validate_weights(changes)
        if not valid:
            return 0
        classes = json.dumps([rc.value for rc in ResourceClass])
        return int(self._conn.run("set_weights", json.dumps(valid), reason, classes))

    def target_depths(self, defaults: Mapping[ResourceClass, int]) -> dict[ResourceClass, int]:
        """Each class's target depth: the value in Redis, else the given default."""
        stored: dict[str, str] = self._redis.hgetall(self._keys.key("target_depth"))
        return {rc: int(stored.get(rc.value) or defaults.get(rc, 16)) for rc in ResourceClass}

    def set_target_depth(self, resource_class: ResourceClass, depth: int, reason: str) -> None:
        if isinstance(depth, bool) or int(depth) < 0:
            raise ValueError("target depth must be a non-negative integer")
        self._conn.run("set_target_depth", ResourceClass(resource_class).value, int(depth), reason)

    def changes(self, limit: int = 20) -> list[dict[str, Any]]:
        """The last changes of weights and target depths, newest first, with their reasons."""
        return [json.loads(raw) for raw in self._redis.lrange(self._keys.key("changes"), 0, limit - 1)]

    def record_feedback(self, record: Mapping[str, str]) -> None:
        """The feedback loop's last round (source, reason, figures, targets, changes), for operators."""
        self._redis.hset(self._keys.key("feedback"), mapping=dict(record))

    # --- the release lease: one router runs the release loop ---------------------------------

    def lead(self, router_id: str, ttl: float) -> bool:
        """Take or renew the release lease; True while this router holds it."""
        return bool(self._conn.run("lead", router_id, max(1, int(ttl * 1000))))

    def resign(self, router_id: str) -> None:
        self._conn.run("resign", router_id)

    def leader(self) -> str | None:
        holder: str | None = self._redis.get(self._keys.key("leader"))
        return holder

    def count_loop_release(self, router_id: str, count: int) -> None:
        self._redis.hincrby(self._keys.key("loop_released"), router_id, count)

    def loop_released(self) -> dict[str, int]:
        return {k: int(v) for k, v in self._redis.hgetall(self._keys.key("loop_released")).items()}
