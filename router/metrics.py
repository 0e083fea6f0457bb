"""The router's Prometheus metrics: counters it owns plus fleet gauges read from Redis at scrape.

Finished jobs are observed by `FinishWatcher`, a cheap periodic scan of the job
store's state indexes: a job that finished since the last scan was running then
(or was created after it), so only index members scored at or after the oldest
running job's creation time need a look. Every router watches every finish (its
feedback figures need them), but each finish is counted by one router only: the one
whose `HSETNX <job> counted_by` wins, so counters summed over replicas are right. The
per-state job counts come straight from the Redis indexes at scrape, so they are right
across router restarts.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from edgefleet import metric_names
from edgefleet.celery_app import node_queue
from edgefleet.scheduling.state import SchedulerState
from edgefleet.schemas import PriorityClass, ResourceClass
from edgefleet.store import FinishedJob, JobStore

log = logging.getLogger(__name__)

TERMINAL_STATES = ("succeeded", "failed", "cancelled")
JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 7200)
SUBMIT_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


def celery_queue_length(store: JobStore, queue: str) -> int:
    """Messages waiting in a Celery queue on Redis: the list plus its priority lists."""
    return store.broker_queue_length(queue, metric_names.PRIORITY_LIST_SUFFIXES)


def broker_queues(store: JobStore) -> list[str]:
    """The class queues and the direct queues of the live nodes."""
    queues = [rc.value for rc in ResourceClass]
    for node in store.nodes.live_nodes():
        for rc in node.classes:
            queues.append(f"{node_queue(node.name)}.{rc.value}")
    return queues


class FleetCollector(Collector):
    def __init__(self, store: JobStore, scheduler: SchedulerState) -> None:
        self.store = store
        self.scheduler = scheduler

    def collect(self) -> Iterator[GaugeMetricFamily]:
        store, scheduler = self.store, self.scheduler
        backlog = GaugeMetricFamily(
            metric_names.BACKLOG_DEPTH,
            "ready subtasks not yet released, by the priority class of their job",
            labels=["resource_class", "priority_class"],
        )
        queued = GaugeMetricFamily(
            metric_names.QUEUED_DEPTH, "released subtasks not yet claimed", labels=["resource_class"]
        )
        for rc, counts in scheduler.backlog_counts().items():
            for priority_class, n in counts.items():
                backlog.add_metric([rc.value, priority_class], n)
        for rc in ResourceClass:
            queued.add_metric([rc.value], scheduler.queued_size(rc))
        running = GaugeMetricFamily(metric_names.RUNNING_SUBTASKS, "subtasks holding a lease")
        running.add_metric([], store.attempts.running_count())
        nodes = GaugeMetricFamily(metric_names.LIVE_NODES, "worker nodes with a live heartbeat")
        nodes.add_metric([], len(store.nodes.live_nodes()))
        jobs = GaugeMetricFamily(metric_names.JOBS_BY_STATE, "jobs per state (Redis indexes)", labels=["state"])
        for state, count in store.job_counts().items():
            jobs.add_metric([state.value], count)
        depth = GaugeMetricFamily(
            metric_names.BROKER_QUEUE_DEPTH, "released subtasks waiting in the Celery queue", labels=["queue_name"]
        )
        celery_len = GaugeMetricFamily(
            metric_names.CELERY_QUEUE_LENGTH,
            "messages in the Celery queue (celery-exporter name)",
            labels=["queue_name"],
        )
        for queue in broker_queues(store):
            n = celery_queue_length(store, queue)
            depth.add_metric([queue], n)
            celery_len.add_metric([queue], n)
        yield from (backlog, queued, running, nodes, jobs, depth, celery_len)


@dataclass
class Observed:
    """What the router saw of recently finished work: the feedback loop's Redis-side figures."""

    run_seconds: dict[str, float] = field(default_factory=dict)  # EWMA per resource class
    wait_seconds: dict[str, float] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)  # subtasks seen finishing, per class
    latencies: dict[str, deque[tuple[float, float]]] = field(
        default_factory=lambda: {p.value: deque(maxlen=500) for p in PriorityClass}
    )

    def p95(self, priority: str, window: float = 300.0) -> float | None:
        cutoff = time.time() - window
        values = sorted(v for at, v in self.latencies.get(priority, ()) if at >= cutoff)
        if not values:
            return None
        return values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)]


class FinishWatcher:
    """Counts jobs as they finish and keeps per-class run/wait figures; a thread of the router."""

    ALPHA = 0.3

    def __init__(self, store: JobStore, metrics: RouterMetrics, router_id: str, interval: float = 1.0) -> None:
        self.store = store
        self.metrics = metrics
        self.router_id = router_id
        self.interval = interval
        self.observed = Observed()
        self._seen: dict[str, float] = {}  # job id -> creation score
        self._floor: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ef-finish-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:
                log.debug("finish scan failed", exc_info=True)
            self._stop.wait(self.interval)

    def scan(self) -> int:
        """One pass; returns how many newly finished jobs it saw (none on the first pass)."""
        store = self.store
        now = store.now()  # job scores are Redis time
        oldest = store.oldest_running_created()
        next_floor = min(oldest, now) if oldest is not None else now
        first = self._floor is None
        floor = next_floor if self._floor is None else self._floor
        new: list[tuple[str, str, float]] = []
        for state in TERMINAL_STATES:
            for job_id, score in store.jobs_created_since(state, floor):
                if job_id not in self._seen:
                    self._seen[job_id] = score
                    if not first:
                        new.append((job_id, state, score))
        self._floor = next_floor
        self._seen = {j: s for j, s in self._seen.items() if s >= next_floor}
        # Every router watches every finish (its feedback figures need them all), but each finish
        # is counted by one router only, so that counters summed over routers are right.
        claims = store.mark_counted([job_id for job_id, _, _ in new], self.router_id)
        jobs = store.finished_jobs([job_id for job_id, _, _ in new])
        for (_, state, _), claimed, job in zip(new, claims, jobs, strict=True):
            if job is not None:
                self._observe(job, state, count=bool(claimed))
        return len(new)

    def _observe(self, job: FinishedJob, state: str, *, count: bool) -> None:
        priority, created, finished = job.priority, job.created_at, job.finished_at
        if count:
            self.metrics.finished.labels(priority=priority, state=state).inc()
        if created and finished and state == "succeeded":
            latency = max(0.0, finished - created)
            if count:
                self.metrics.job_seconds.labels(priority=priority).observe(latency)
            with self._lock:
                self.observed.latencies.setdefault(priority, deque(maxlen=500)).append((time.time(), latency))
        for st in job.subtasks:
            rc, queued, started, done = st.resource_class, st.queued_at, st.started_at, st.finished_at
            if not (rc and queued and started and done) or st.state != "succeeded":
                continue
            run, wait = done - started, max(0.0, started - queued)
            with self._lock:
                obs = self.observed
                obs.run_seconds[rc] = (
                    run if rc not in obs.run_seconds else (1 - self.ALPHA) * obs.run_seconds[rc] + self.ALPHA * run
                )
                obs.wait_seconds[rc] = (
                    wait if rc not in obs.wait_seconds else (1 - self.ALPHA) * obs.wait_seconds[rc] + self.ALPHA * wait
                )
                obs.finished[rc] = obs.finished.get(rc, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            obs = self.observed
            return {
                "run_seconds": dict(obs.run_seconds),
                "wait_seconds": dict(obs.wait_seconds),
                "finished": dict(obs.finished),
                "interactive_p95": obs.p95(PriorityClass.interactive.value),
            }


class SubmitTimer:
    """ASGI wrapper timing POST /v1/jobs from request to the end of the response."""

    def __init__(self, app: Any, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") != "/v1/jobs":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.histogram.observe(time.perf_counter() - started)


class RouterMetrics:
    def __init__(self, store: JobStore, scheduler: SchedulerState, router_id: str) -> None:
        self.registry = CollectorRegistry()
        self.submitted = Counter(metric_names.JOBS_SUBMITTED, "jobs accepted", ["priority"], registry=self.registry)
        self.finished = Counter(
            metric_names.JOBS_FINISHED, "jobs this router saw finish", ["priority", "state"], registry=self.registry
        )
        self.job_seconds = Histogram(
            metric_names.JOB_SECONDS,
            "job latency, creation to finish (succeeded jobs)",
            ["priority"],
            buckets=JOB_BUCKETS,
            registry=self.registry,
        )
        self.submit_seconds = Histogram(
            metric_names.SUBMIT_SECONDS, "time to answer POST /v1/jobs", buckets=SUBMIT_BUCKETS, registry=self.registry
        )
        self.released = Counter(metric_names.RELEASED, "subtasks sent to Celery", registry=self.registry)
        self.requeued = Counter(
            metric_names.REQUEUED, "subtasks given a new attempt after a lost lease", registry=self.registry
        )
        self.callbacks = Counter(metric_names.CALLBACKS, "completion callbacks", ["outcome"], registry=self.registry)
        # The feedback loop's decisions.
        self.target_depth = Gauge(
            metric_names.TARGET_DEPTH, "target depth the feedback loop set", ["resource_class"], registry=self.registry
        )
        self.weight = Gauge(
            metric_names.SCHEDULER_WEIGHT, "priority weights the feedback loop set", ["name"], registry=self.registry
        )
        self.feedback_source = Gauge(
            metric_names.FEEDBACK_SOURCE,
            "1 for where the last feedback round read its figures",
            ["source"],
            registry=self.registry,
        )
        self.feedback_rounds = Counter(
            metric_names.FEEDBACK_ROUNDS, "feedback rounds", ["source"], registry=self.registry
        )
        self.feedback_changes = Counter(
            metric_names.FEEDBACK_CHANGES, "changes the feedback loop made", ["kind"], registry=self.registry
        )
        self.feedback_slots = Gauge(
            metric_names.FEEDBACK_SLOTS,
            "live worker slots per class, as the feedback loop saw them",
            ["resource_class"],
            registry=self.registry,
        )
        self.feedback_p95 = Gauge(
            metric_names.FEEDBACK_INTERACTIVE_P95,
            "interactive job p95 latency the feedback loop saw",
            registry=self.registry,
        )
        self.registry.register(FleetCollector(store, scheduler))
        self.watcher = FinishWatcher(store, self, router_id)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
