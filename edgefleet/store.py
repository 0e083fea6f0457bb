"""The job store: jobs, subtasks and their DAG in Redis, every transition one Lua script."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import redis

from edgefleet import store_lua
from edgefleet.keys import Keys
from edgefleet.scheduling import priority
from edgefleet.schemas import (
    JobPage,
    JobState,
    JobStatus,
    JobSummary,
    NodeInfo,
    Plan,
    PriorityClass,
    ResourceClass,
    SubtaskEnvelope,
    SubtaskState,
    SubtaskStatus,
)

Outcome = Literal["succeeded", "failed", "cancelled"]
IDEMPOTENCY_TTL = 7 * 24 * 3600
DEFAULT_RETENTION = 7 * 24 * 3600.0  # Settings.job_retention's default; the router passes its own


@dataclass(frozen=True)
class CreateResult:
    job_id: str
    created: bool
    request_hash: str


@dataclass(frozen=True)
class Released:
    envelope: SubtaskEnvelope
    queue: str

    @property
    def dispatch_member(self) -> str:
        env = self.envelope
        return f"{env.job_id}|{env.subtask_id}|{env.attempt}"


@dataclass(frozen=True)
class Claim:
    """What a worker learns when it tries to own a delivered subtask."""

    verdict: Literal["run", "drop", "owned"]
    reason: str = ""
    args: dict[str, Any] | None = None
    needs_outputs: dict[str, Any] | None = None
    owner_pid: int | None = None
    checkpoint: Any = None


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


@dataclass(frozen=True)
class Lost:
    """What became of an attempt reported lost: requeued, cancelled, failed, or stale."""

    verdict: str
    ready_classes: list[ResourceClass]


@dataclass(frozen=True)
class Renewal:
    still_owner: bool
    job_state: str


@dataclass(frozen=True)
class GcBatch:
    removed: list[str]
    remaining: int


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _opt_float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def _opt_str(value: str | None) -> str | None:
    return value if value not in (None, "") else None


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "ef") -> None:
        self.redis = client
        self.keys = Keys(prefix)
        self._prefix = prefix
        self._scripts = {
            name: client.register_script(getattr(store_lua, name))
            for name in (
                "CREATE_JOB",
                "RELEASE",
                "DISPATCHED",
                "PROMOTE_DELAYED",
                "CLAIM",
                "RENEW",
                "COMPLETE",
                "CHECKPOINT",
                "CANCEL",
                "REAP",
                "LOST",
                "LOSE_PROCESSES",
                "BACKLOG_COUNTS",
                "SET_WEIGHTS",
                "SEED_WEIGHTS",
                "SET_TARGET_DEPTH",
                "LEAD",
                "RESIGN",
            )
        }

    @classmethod
    def from_url(cls, url: str, prefix: str = "ef", retention: float | None = None) -> "JobStore":
        client = redis.Redis.from_url(
            url, decode_responses=True, health_check_interval=30, socket_keepalive=True
        )
        store = cls(client, prefix)
        if retention is not None:
            store.retention = retention
        return store

    def _run(self, name: str, *args: Any) -> Any:
        return self._scripts[name](keys=[], args=[self._prefix, *args])

    # --- jobs -------------------------------------------------------------------------

    def create_job(
        self,
        *,
        job_id: str,
        tenant: str,
        priority: PriorityClass,
        name: str | None,
        callback_url: str | None,
        plan: Plan,
        request_json: str,
        request_hash: str,
        idempotency_key: str | None,
        deadline_s: float | None = None,
    ) -> CreateResult:
        payload = {
            "job": {
                "id": job_id,
                "tenant": tenant,
                "priority": priority.value,
                "name": name or "",
                "callback_url": callback_url or "",
                "request_hash": request_hash,
                "request": request_json,
                "deadline_s": deadline_s,
            },
            "subtasks": [
                {
                    "id": st.id,
                    "plugin": st.plugin,
                    "action": st.action,
                    "resource_class": st.resource_class.value,
                    "node": st.node or "",
                    # Pre-encoded: Lua's cjson turns an empty list into {}.
                    "needs": json.dumps(st.needs),
                    "n_needs": len(st.needs),
                    "dependents": json.dumps(st.dependents),
                    "args": json.dumps(st.args),
                    "timeout": st.timeout,
                    "retries": st.retries,
                    "retry_backoff": st.retry_backoff,
                }
                for st in plan.subtasks
            ],
            "idem_key": self.keys.idempotency(tenant, idempotency_key) if idempotency_key else "",
            "idem_ttl": IDEMPOTENCY_TTL,
        }
        verdict, existing_id, existing_hash = self._run("CREATE_JOB", json.dumps(payload))
        if verdict == "exists":
            raise RuntimeError(f"job id collision: {existing_id}")
        return CreateResult(existing_id, verdict == "created", existing_hash)

    def find_idempotent(self, tenant: str, key: str) -> tuple[str, str] | None:
        """The job an Idempotency-Key already made, with its request hash."""
        job_id = self.redis.get(self.keys.idempotency(tenant, key))
        if not job_id:
            return None
        return job_id, self.redis.hget(self.keys.job(job_id), "request_hash") or ""

    def get_job(self, job_id: str) -> JobStatus | None:
        job = self.redis.hgetall(self.keys.job(job_id))
        if not job:
            return None
        order: list[str] = json.loads(job["order"])
        pipe = self.redis.pipeline(transaction=False)
        for sid in order:
            pipe.hgetall(self.keys.subtask(job_id, sid))
        subtasks = [self._subtask_status(raw) for raw in pipe.execute()]
        return JobStatus(
            id=job["id"],
            name=_opt_str(job.get("name")),
            state=JobState(job["state"]),
            priority=PriorityClass(job["priority"]),
            tenant=job["tenant"],
            created_at=float(job["created_at"]),
            updated_at=float(job["updated_at"]),
            finished_at=_opt_float(job.get("finished_at")),
            error=_opt_str(job.get("error")),
            failed_subtask=_opt_str(job.get("failed_subtask")),
            callback_url=_opt_str(job.get("callback_url")),
            deadline_at=_opt_float(job.get("deadline_at")),
            expires_at=self.expires_at(_opt_float(job.get("finished_at"))),
            subtasks=subtasks,
        )

    @staticmethod
    def _subtask_status(raw: dict[str, str]) -> SubtaskStatus:
        output = raw.get("output")
        return SubtaskStatus(
            id=raw["id"],
            plugin=raw["plugin"],
            action=raw["action"],
            resource_class=ResourceClass(raw["resource_class"]),
            state=SubtaskState(raw["state"]),
            needs=json.loads(raw["needs"]),
            attempt=int(raw["attempt"]),
            max_attempts=int(raw["retries"]) + 1,
            node=_opt_str(raw.get("owner_node")) or _opt_str(raw.get("last_node")),
            queue=_opt_str(raw.get("queue")),
            queued_at=_opt_float(raw.get("queued_at")),
            started_at=_opt_float(raw.get("started_at")),
            finished_at=_opt_float(raw.get("finished_at")),
            progress=_opt_float(raw.get("progress")),
            progress_message=_opt_str(raw.get("progress_message")),
            output=json.loads(output) if output else None,
            error=_opt_str(raw.get("error")),
            checkpoint=json.loads(raw["checkpoint"]) if raw.get("checkpoint") else None,
            resumed=int(raw.get("resumed") or 0),
            isolation=_opt_str(raw.get("isolation")),
            cpu_seconds=_opt_float(raw.get("cpu_seconds")),
            max_rss_mb=_opt_float(raw.get("max_rss_mb")),
        )

    def list_jobs(
        self,
        *,
        tenant: str | None,
        state: JobState | None,
        limit: int,
        cursor: str | None,
    ) -> JobPage:
        """Newest first. The cursor names the last job seen (its creation score and id), so
        jobs submitted between two pages neither repeat nor shift the next page."""
        index = self.keys.jobs_index(tenant, state.value if state else None)
        if cursor:
            score_text, _, last_id = cursor.partition("_")
            last_score = float(score_text)
            # Equal scores come in descending id order; skip up to and including the last id.
            rows = self.redis.zrevrangebyscore(
                index, last_score, "-inf", start=0, num=limit + 1 + 64, withscores=True
            )
            rows = [(i, sc) for i, sc in rows if sc < last_score or (sc == last_score and i < last_id)]
        else:
            rows = self.redis.zrevrange(index, 0, limit, withscores=True)
        has_more = len(rows) > limit
        rows = rows[:limit]
        pipe = self.redis.pipeline(transaction=False)
        for job_id, _ in rows:
            pipe.hmget(
                self.keys.job(job_id),
                ["id", "name", "state", "priority", "tenant", "created_at", "finished_at"],
            )
        summaries = [
            JobSummary(
                id=row[0],
                name=_opt_str(row[1]),
                state=JobState(row[2]),
                priority=PriorityClass(row[3]),
                tenant=row[4],
                created_at=float(row[5]),
                finished_at=_opt_float(row[6]),
                expires_at=self.expires_at(_opt_float(row[6])),
            )
            for row in pipe.execute()
            if row[0]
        ]
        next_cursor = f"{rows[-1][1]!r}_{rows[-1][0]}" if has_more and rows else None
        return JobPage(jobs=summaries, next_cursor=next_cursor)

    def cancel_job(self, job_id: str) -> str:
        return str(self._run("CANCEL", job_id))

    # --- retention: finished jobs are deleted `retention` seconds after they finish -----------

    retention: float = DEFAULT_RETENTION

    def expires_at(self, finished_at: float | None) -> float | None:
        return None if finished_at is None else finished_at + self.retention

    def gc(self, older_than: float | None = None, limit: int = 500) -> GcBatch:
        """Delete up to `limit` jobs that finished more than `older_than` seconds ago (default:
        the retention): the job, its subtasks, events, idempotency key and index entries.
        Running jobs are never in the finished index, so they are never deleted."""
        age = self.retention if older_than is None else older_than
        script = self._scripts.get("GC") or self._scripts.setdefault("GC", self.redis.register_script(store_lua.GC))
        remaining, removed = script(keys=[], args=[self._prefix, age, limit])
        return GcBatch(removed=list(removed), remaining=int(remaining))

    def job_states(self, job_ids: list[str]) -> dict[str, str | None]:
        """Each job's state, None for a job the store does not have (never had, or deleted)."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.keys.job(job_id), "state")
        return dict(zip(job_ids, pipe.execute()))

    def index_finished(self, batch: int = 1000) -> int:
        """Put finished jobs written before the finished index existed into it (idempotent)."""
        added = 0
        for state in (JobState.succeeded, JobState.failed, JobState.cancelled):
            for chunk in _chunks(self.redis.zscan_iter(self.keys.jobs_index(None, state.value)), batch):
                ids = [job_id for job_id, _ in chunk]
                pipe = self.redis.pipeline(transaction=False)
                for job_id in ids:
                    pipe.hget(self.keys.job(job_id), "finished_at")
                scores = {i: float(f) for i, f in zip(ids, pipe.execute()) if f}
                if scores:
                    added += int(self.redis.zadd(self.keys.finished, scores, nx=True))
        return added

    # --- release to the broker ----------------------------------------------------------

    def release(self, resource_class: ResourceClass, max_count: int, target_depth: int) -> list[Released]:
        raw = self._run("RELEASE", resource_class.value, max_count, target_depth)
        items = json.loads(raw) if raw and raw != "{}" else []
        return [
            Released(
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
            )
            for item in items
        ]

    def set_queue(self, env: SubtaskEnvelope, queue: str) -> None:
        """The queue a released subtask was actually sent to (the reaper looks there)."""
        self.redis.hset(self.keys.subtask(env.job_id, env.subtask_id), "queue", queue)

    def mark_dispatched(self, released: list[Released]) -> None:
        if released:
            self._run("DISPATCHED", *[r.dispatch_member for r in released])

    def promote_delayed(self, max_count: int = 500) -> int:
        return int(self._run("PROMOTE_DELAYED", max_count))

    def reap(self, *, max_lost: int, dispatch_grace: float, stranded_after: float, batch: int = 200) -> int:
        return int(self._run("REAP", max_lost, dispatch_grace, batch, stranded_after))

    def backlog_size(self, resource_class: ResourceClass) -> int:
        return int(self.redis.zcard(self.keys.backlog(resource_class)))

    def backlog_counts(self) -> dict[ResourceClass, dict[str, int]]:
        """Ready subtasks per resource class and priority class of their job, in one atomic read.

        Every priority class is present (0 when none wait); a class whose stored counts do not
        add up to its backlog is recounted first (see `store_lua.BACKLOG_COUNTS`)."""
        raw = json.loads(self._run("BACKLOG_COUNTS", json.dumps([rc.value for rc in ResourceClass])))
        out: dict[ResourceClass, dict[str, int]] = {}
        for rc in ResourceClass:
            counts = (raw.get(rc.value) or {}).get("counts") or {}
            row = {p.value: 0 for p in PriorityClass}
            for name, n in counts.items():
                row[name] = int(n)
            out[rc] = row
        return out

    def queued_size(self, resource_class: ResourceClass) -> int:
        return int(self.redis.zcard(self.keys.queued(resource_class)))

    # --- scheduler state: weights, target depths, the release lease ---------------------
    # Key names: <prefix>:scheduler:weights (hash), :target_depth (hash), :changes (list,
    # newest first, 20 kept), :leader (the lease), :loop_released (hash router id -> count).

    def _sched(self, name: str) -> str:
        return f"{self._prefix}:scheduler:{name}"

    def seed_weights(self, defaults: dict[str, float]) -> int:
        """Fill in the weights Redis does not have yet; values already there win."""
        return int(self._run("SEED_WEIGHTS", json.dumps(priority.validate_weights(defaults))))

    def weights(self) -> dict[str, float]:
        stored = self.redis.hgetall(self._sched("weights"))
        out = dict(priority.DEFAULT_WEIGHTS)
        for name, value in stored.items():
            try:
                out[name] = float(value)
            except ValueError:
                continue
        return out

    def set_weights(self, changes: dict[str, float], reason: str) -> int:
        """Change some weights, log the change with its reason, and rescore every waiting
        subtask with the new weights, all in one atomic step. Returns the rescored count."""
        valid = priority.validate_weights(changes)
        if not valid:
            return 0
        return int(
            self._run("SET_WEIGHTS", json.dumps(valid), reason, json.dumps([rc.value for rc in ResourceClass]))
        )

    def target_depths(self, defaults: dict[ResourceClass, int]) -> dict[ResourceClass, int]:
        """Each class's target depth: the value in Redis, else the given default."""
        stored = self.redis.hgetall(self._sched("target_depth"))
        return {rc: int(stored.get(rc.value) or defaults.get(rc, 16)) for rc in ResourceClass}

    def set_target_depth(self, resource_class: ResourceClass, depth: int, reason: str) -> None:
        if isinstance(depth, bool) or int(depth) < 0:
            raise ValueError("target depth must be a non-negative integer")
        self._run("SET_TARGET_DEPTH", ResourceClass(resource_class).value, int(depth), reason)

    def scheduler_changes(self, limit: int = 20) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.redis.lrange(self._sched("changes"), 0, limit - 1)]

    def lead(self, router_id: str, ttl: float) -> bool:
        """Take or renew the release lease; True while this router holds it."""
        return bool(self._run("LEAD", router_id, max(1, int(ttl * 1000))))

    def resign(self, router_id: str) -> None:
        self._run("RESIGN", router_id)

    def leader(self) -> str | None:
        return self.redis.get(self._sched("leader"))

    def count_loop_release(self, router_id: str, count: int) -> None:
        self.redis.hincrby(self._sched("loop_released"), router_id, count)

    def loop_released(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.redis.hgetall(self._sched("loop_released")).items()}

    def backlog_order(self, resource_class: ResourceClass, limit: int = 100) -> list[tuple[str, float]]:
        """The first `limit` backlog members ("job|subtask") with their scores, next first."""
        return self.redis.zrange(self.keys.backlog(resource_class), 0, limit - 1, withscores=True)

    def tenant_active(self, tenant: str) -> int:
        return int(self.redis.get(f"{self._prefix}:tenant_active:{tenant}") or 0)

    # --- worker side --------------------------------------------------------------------

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
    ) -> Claim:
        """Own a delivered attempt. `token` names this delivery: the same claim sent again
        (its first reply lost to a connection error) is answered "run" again, not "owned"."""
        result = self._run(
            "CLAIM",
            env.job_id,
            env.subtask_id,
            env.attempt,
            node,
            pid,
            lease_ttl,
            dead_pid if dead_pid is not None else "",
            max_lost,
            token,
        )
        verdict = result[0]
        if verdict == "run":
            outputs = {k: json.loads(v) for k, v in json.loads(result[2]).items()} if result[2] != "{}" else {}
            checkpoint = json.loads(result[3]) if result[3] else None
            return Claim("run", args=json.loads(result[1]), needs_outputs=outputs, checkpoint=checkpoint)
        if verdict == "owned":
            return Claim("owned", owner_pid=int(result[1]) if result[1] else None)
        return Claim("drop", reason=result[1])

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
        result = self._run(
            "RENEW", env.job_id, env.subtask_id, env.attempt, node, pid, lease_ttl, fraction, message
        )
        return Renewal(still_owner=result[0] == "ok", job_state=result[1])

    def save_checkpoint(self, env: SubtaskEnvelope, *, node: str, pid: int, state: Any) -> bool:
        """Store a running attempt's checkpoint; refused (False) if the attempt lost ownership."""
        return bool(
            self._run("CHECKPOINT", env.job_id, env.subtask_id, env.attempt, node, pid, json.dumps(state))
        )

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
    ) -> "Completion":
        """Record an attempt's end (and what it used). A stale attempt (reaped, taken over) is not accepted."""
        result = self._run(
            "COMPLETE",
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
        )
        if result[0] == "stale":
            return Completion(accepted=False, job_state=result[1], ready_classes=[])
        ready = [ResourceClass(c) for c in result[2].split(",") if c]
        return Completion(accepted=True, job_state=result[1], ready_classes=ready)

    def lost(self, env: SubtaskEnvelope, *, node: str, pid: int, max_lost: int, why: str) -> Lost:
        """The attempt's plugin process was killed by something outside it: a new attempt
        (resuming from its checkpoint) whatever its retries, until it is lost `max_lost` times."""
        verdict, detail = self._run("LOST", env.job_id, env.subtask_id, env.attempt, node, pid, max_lost, why)
        ready = [ResourceClass(detail)] if verdict == "requeued" else []
        return Lost(verdict=verdict, ready_classes=ready)

    def lose_processes(self, node: str, pids: list[int], max_lost: int) -> list[ResourceClass]:
        """Processes of `node` that died: their running attempts are lost now (requeued, or
        failed past `max_lost`), not when their leases expire. Returns the classes with work ready."""
        if not pids:
            return []
        raw = self._run("LOSE_PROCESSES", node, json.dumps([str(p) for p in pids]), max_lost)
        return [ResourceClass(c) for c in raw or []]

    # --- callbacks ----------------------------------------------------------------------

    def pop_callback(self, timeout: float) -> str | None:
        got = self.redis.blpop([self.keys.callbacks], timeout=timeout)
        return got[1] if got else None

    def heartbeat(self, info: NodeInfo, ttl: float) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.keys.node(info.name), info.model_dump_json(), px=int(ttl * 1000))
        pipe.sadd(self.keys.nodes, info.name)
        pipe.execute()

    def remove_node(self, name: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.node(name))
        pipe.srem(self.keys.nodes, name)
        pipe.execute()

    def live_nodes(self) -> list[NodeInfo]:
        names = sorted(self.redis.smembers(self.keys.nodes))
        if not names:
            return []
        values = self.redis.mget([self.keys.node(n) for n in names])
        gone = [n for n, v in zip(names, values) if v is None]
        if gone:
            self.redis.srem(self.keys.nodes, *gone)
        return [NodeInfo.model_validate_json(v) for v in values if v is not None]

    def mark_warm(self, node: str, models: list[str], ttl: float) -> None:
        """Models loaded in some worker process of `node`; read back into the node's heartbeat."""
        if not models:
            return
        key = self.keys.warm_models(node)
        pipe = self.redis.pipeline(transaction=True)
        pipe.sadd(key, *models)
        pipe.expire(key, int(ttl))
        pipe.execute()

    def warm_models(self, node: str) -> list[str]:
        return sorted(self.redis.smembers(self.keys.warm_models(node)))

    def ping(self) -> bool:
        return bool(self.redis.ping())

