"""The job store: jobs, subtasks and their DAG in Redis, every transition one Lua script.

`JobStore` is the one object a process holds: its connection (one client, the key names
of `edgefleet.keys`, the scripts of `lua/`) is shared by the parts, each a class of its
own: `attempts` (what workers do with a delivered subtask), `nodes` (heartbeats),
`webhooks` (callback deliveries and signing secrets); the release scheduler's state is
`edgefleet.scheduling.state.SchedulerState.of(store)`. Nothing outside the store
packages reads Redis keys: what they need is a method here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from edgefleet.schemas import (
    JobPage,
    JobState,
    JobStatus,
    JobSummary,
    Plan,
    PriorityClass,
    ResourceClass,
    SubtaskState,
    SubtaskStatus,
)
from edgefleet.store.artifacts import ArtifactStore
from edgefleet.store.attempts import AttemptStore
from edgefleet.store.connection import StoreConnection, redis_client
from edgefleet.store.nodes import NodeStore
from edgefleet.store.webhooks import WebhookStore

IDEMPOTENCY_TTL = 7 * 24 * 3600
DEFAULT_RETENTION = 7 * 24 * 3600.0  # Settings.job_retention's default; the router passes its own


@dataclass(frozen=True)
class NewJob:
    """One job for `JobStore.create_jobs`: its planned subtasks and what the job hash keeps."""

    job_id: str
    tenant: str
    priority: PriorityClass
    name: str | None
    callback_url: str | None
    plan: Plan
    request_hash: str
    idempotency_key: str | None
    deadline_s: float | None = None


@dataclass(frozen=True)
class CreateResult:
    job_id: str
    created: bool
    request_hash: str
    # Redis' time of the create call: the new job's created_at (not the existing job's when not created).
    created_at: float = 0.0


@dataclass(frozen=True)
class KnownKey:
    """An Idempotency-Key's job: its id, request hash and state."""

    job_id: str
    request_hash: str
    state: str


@dataclass(frozen=True)
class GcBatch:
    removed: list[str]
    remaining: int


@dataclass(frozen=True)
class SubtaskTimes:
    """One subtask of a finished job, as the router's finish watcher sees it."""

    resource_class: str | None
    state: str | None
    queued_at: float | None
    started_at: float | None
    finished_at: float | None


@dataclass(frozen=True)
class FinishedJob:
    """A finished job's priority class, times and subtasks: the feedback loop's figures."""

    priority: str
    created_at: float | None
    finished_at: float | None
    subtasks: list[SubtaskTimes]


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
        self.connection = StoreConnection(client, prefix)
        self._conn = self.connection
        self._redis = self.connection.client
        self._keys = self.connection.keys
        self.attempts = AttemptStore(self.connection)
        self.nodes = NodeStore(self.connection)
        self.webhooks = WebhookStore(self.connection)
        self.artifacts = ArtifactStore(self.connection)

    @classmethod
    def from_url(cls, url: str, prefix: str = "ef", retention: float | None = None) -> JobStore:
        store = cls(redis_client(url), prefix)
        if retention is not None:
            store.retention = retention
        return store

    def ping(self) -> bool:
        return bool(self._redis.ping())

    def close(self) -> None:
        self.connection.close()

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
        request_hash: str,
        idempotency_key: str | None,
        deadline_s: float | None = None,
        request_json: str | None = None,
    ) -> CreateResult:
        """One job (see `create_jobs`). `request_json` is not kept (the job hash holds no copy of
        the request since it was slimmed); the parameter stays for existing callers."""
        del request_json
        job = NewJob(
            job_id=job_id,
            tenant=tenant,
            priority=priority,
            name=name,
            callback_url=callback_url,
            plan=plan,
            request_hash=request_hash,
            idempotency_key=idempotency_key,
            deadline_s=deadline_s,
        )
        return self.create_jobs([job])[0]

    def create_jobs(self, jobs: Sequence[NewJob]) -> list[CreateResult]:
        """Create the jobs in one script call, in order (a key given twice: the first makes the job,
        the second gets it back as `created=False`); one result per job, same order."""
        if not jobs:
            return []
        payload = {"jobs": [self._create_item(job) for job in jobs], "idem_ttl": IDEMPOTENCY_TTL}
        answer = self._conn.run("create_job", json.dumps(payload))
        created_at = float(answer[0])
        results: list[CreateResult] = []
        for i in range(1, len(answer), 3):
            verdict, job_id, digest = answer[i], answer[i + 1], answer[i + 2]
            if verdict == "exists":
                raise RuntimeError(f"job id collision: {job_id}")
            results.append(CreateResult(job_id, verdict == "created", digest, created_at))
        return results

    def _create_item(self, job: NewJob) -> dict[str, Any]:
        return {
            "job": {
                "id": job.job_id,
                "tenant": job.tenant,
                "priority": job.priority.value,
                "name": job.name or "",
                "callback_url": job.callback_url or "",
                "request_hash": job.request_hash,
                "deadline_s": job.deadline_s,
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
                for st in job.plan.subtasks
            ],
            "idem_key": self._keys.idempotency(job.tenant, job.idempotency_key) if job.idempotency_key else "",
        }

    def find_idempotent(self, tenant: str, key: str) -> tuple[str, str] | None:
        """The job an Idempotency-Key already made, with its request hash."""
        job_id = self._redis.get(self._keys.idempotency(tenant, key))
        if not job_id:
            return None
        return job_id, self._redis.hget(self._keys.job(job_id), "request_hash") or ""

    def find_idempotent_many(self, tenant: str, keys: Sequence[str]) -> dict[str, KnownKey]:
        """The live jobs these Idempotency-Keys already made (two round trips for any number of keys)."""
        if not keys:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.get(self._keys.idempotency(tenant, key))
        found = {key: job_id for key, job_id in zip(keys, pipe.execute(), strict=True) if job_id}
        pipe = self._redis.pipeline(transaction=False)
        for job_id in found.values():
            pipe.hmget(self._keys.job(job_id), ["request_hash", "state"])
        known: dict[str, KnownKey] = {}
        for (key, job_id), (digest, state) in zip(found.items(), pipe.execute(), strict=True):
            if state:  # else the key outlived its job (deleted by retention): the key is free
                known[key] = KnownKey(job_id, digest or "", state)
        return known

    def get_job(self, job_id: str) -> JobStatus | None:
        job = self._redis.hgetall(self._keys.job(job_id))
        if not job:
            return None
        order: list[str] = json.loads(job["order"])
        pipe = self._redis.pipeline(transaction=False)
        for sid in order:
            pipe.hgetall(self._keys.subtask(job_id, sid))
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
            artifacts=self.artifacts.of_job(job_id, order),
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
            placement=_opt_str(raw.get("placement")),
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
        # A job is in the index of its state only (an index of every state was one more sorted-set
        # entry per job): without a state, the page is merged from the four, read in one MULTI so
        # that a job changing state meanwhile is seen once.
        pipe = self._redis.pipeline(transaction=True)
        last_score, last_id = 0.0, ""
        if cursor:
            score_text, _, last_id = cursor.partition("_")
            last_score = float(score_text)
        for index in [self._keys.jobs_index(tenant, one.value) for one in ([state] if state else list(JobState))]:
            if cursor:
                pipe.zrevrangebyscore(index, last_score, "-inf", start=0, num=limit + 1 + 64, withscores=True)
            else:
                pipe.zrevrange(index, 0, limit, withscores=True)
        rows: list[tuple[str, float]] = [row for found in pipe.execute() for row in found]
        if cursor:
            # Equal scores come in descending id order; skip up to and including the last id.
            rows = [(i, sc) for i, sc in rows if sc < last_score or (sc == last_score and i < last_id)]
        rows.sort(key=lambda row: (row[1], row[0]), reverse=True)
        has_more = len(rows) > limit
        rows = rows[:limit]
        pipe = self._redis.pipeline(transaction=False)
        for job_id, _ in rows:
            pipe.hmget(
                self._keys.job(job_id),
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
        return str(self._conn.run("cancel", job_id))

    # --- retention: finished jobs are deleted `retention` seconds after they finish -----------

    retention: float = DEFAULT_RETENTION

    def expires_at(self, finished_at: float | None) -> float | None:
        return None if finished_at is None else finished_at + self.retention

    def gc(self, older_than: float | None = None, limit: int = 500) -> GcBatch:
        """Delete up to `limit` jobs that finished more than `older_than` seconds ago (default:
        the retention): the job, its subtasks, events, idempotency key and index entries.
        Running jobs are never in the finished index, so they are never deleted."""
        age = self.retention if older_than is None else older_than
        remaining, removed = self._conn.run("gc", age, limit)
        return GcBatch(removed=list(removed), remaining=int(remaining))

    def job_states(self, job_ids: list[str]) -> dict[str, str | None]:
        """Each job's state, None for a job the store does not have (never had, or deleted)."""
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self._keys.job(job_id), "state")
        return dict(zip(job_ids, pipe.execute(), strict=True))

    def index_finished(self, batch: int = 1000) -> int:
        """Put finished jobs written before the finished index existed into it (idempotent)."""
        added = 0
        for state in (JobState.succeeded, JobState.failed, JobState.cancelled):
            for chunk in _chunks(self._redis.zscan_iter(self._keys.jobs_index(None, state.value)), batch):
                ids = [job_id for job_id, _ in chunk]
                pipe = self._redis.pipeline(transaction=False)
                for job_id in ids:
                    pipe.hget(self._keys.job(job_id), "finished_at")
                scores = {i: float(f) for i, f in zip(ids, pipe.execute(), strict=True) if f}
                if scores:
                    added += int(self._redis.zadd(self._keys.finished, scores, nx=True))
        return added

    # --- reads for the router's metrics and feedback -----------------------------------------

    def now(self) -> float:
        """Redis' clock: job and subtask times are Redis time."""
        seconds, micros = self._redis.time()
        return float(seconds) + float(micros) / 1e6

    def job_counts(self) -> dict[JobState, int]:
        """Jobs per state, from the state indexes."""
        pipe = self._redis.pipeline(transaction=False)
        for state in JobState:
            pipe.zcard(self._keys.jobs_index(None, state.value))
        return {state: int(n) for state, n in zip(JobState, pipe.execute(), strict=True)}

    def oldest_running_created(self) -> float | None:
        """Creation time of the oldest job still running."""
        oldest = self._redis.zrange(self._keys.jobs_index(None, JobState.running.value), 0, 0, withscores=True)
        return float(oldest[0][1]) if oldest else None

    def jobs_created_since(self, state: str, since: float) -> list[tuple[str, float]]:
        """(job id, creation time) of the jobs in `state` created at or after `since`."""
        rows: list[tuple[str, float]] = self._redis.zrangebyscore(
            self._keys.jobs_index(None, state), since, "+inf", withscores=True
        )
        return rows

    def mark_counted(self, job_ids: Sequence[str], counter: str) -> list[bool]:
        """For each job, whether `counter` is the first to count its finish (one router counts each)."""
        if not job_ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hsetnx(self._keys.job(job_id), "counted_by", counter)
        return [bool(claimed) for claimed in pipe.execute()]

    def finished_job(self, job_id: str) -> FinishedJob | None:
        """A job's priority, times and subtask times; None for a job the store does not have."""
        return self.finished_jobs([job_id])[0]

    def finished_jobs(self, job_ids: Sequence[str]) -> list[FinishedJob | None]:
        """`finished_job` of each, in two round trips whatever their number (the router's
        finish watcher reads every job that finished since its last pass)."""
        if not job_ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self._keys.job(job_id), ["priority", "created_at", "finished_at", "order"])
        jobs = pipe.execute()
        fields = ["resource_class", "queued_at", "started_at", "finished_at", "state"]
        pipe = self._redis.pipeline(transaction=False)
        orders: list[list[str]] = []
        for job_id, (priority, _, _, order) in zip(job_ids, jobs, strict=True):
            sids = json.loads(order) if priority and order else []
            orders.append(sids)
            for sid in sids:
                pipe.hmget(self._keys.subtask(job_id, sid), fields)
        rows = iter(pipe.execute() if any(orders) else [])
        out: list[FinishedJob | None] = []
        for (priority, created, finished, _), sids in zip(jobs, orders, strict=True):
            if not priority:
                out.append(None)
                continue
            subtasks = [
                SubtaskTimes(rc, st_state, _opt_float(queued), _opt_float(started), _opt_float(done))
                for rc, queued, started, done, st_state in (next(rows) for _ in sids)
            ]
            out.append(FinishedJob(priority, _opt_float(created), _opt_float(finished), subtasks))
        return out

    def broker_queue_length(self, queue: str, suffixes: Sequence[str]) -> int:
        """Messages waiting in a Celery queue on this Redis (the broker shares it): the list
        `queue` plus its priority lists `queue + suffix`."""
        pipe = self._redis.pipeline(transaction=False)
        for suffix in suffixes:
            pipe.llen(queue + suffix)
        return sum(int(n) for n in pipe.execute())

    # --- probes ---------------------------------------------------------------

    def count_probe(self, counter_key: str) -> None:
        """A liveness probe's delivery: +1 on the counter the prober named (its own key, not the store's)."""
        self._redis.incr(counter_key)
