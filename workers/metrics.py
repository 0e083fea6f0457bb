"""Worker metrics. Prefork children write to PROMETHEUS_MULTIPROC_DIR; the node serves the sum.

`WorkerMetrics` lives in every worker process (counters, histograms and a
`livesum` gauge, all safe in multiprocess mode). `NodeCollector` is the node
supervisor's own: gauges of the box (CPU, memory, load, GPUs, slots, class
workers up) read at scrape and served next to the multiprocess collector.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edgefleet import metric_names
from edgefleet.schemas import SubtaskEnvelope

RUN_BUCKETS = (0.005, 0.02, 0.1, 0.5, 1, 2.5, 5, 15, 60, 300, 1800)
WAIT_BUCKETS = (0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 60, 300)

# Failure reasons: a small fixed set (never the error text itself).
_REASONS = (
    ("is not installed", "plugin_missing"),
    ("has no action", "action_missing"),
    ("invalid input", "invalid_input"),
    ("lacks dependencies", "dependencies_unmet"),
    ("timed out", "timeout"),
    ("not found among", "bad_reference"),
    ("reference", "bad_reference"),
)


def failure_reason(error: str) -> str:
    lowered = (error or "").lower()
    for needle, reason in _REASONS:
        if needle in lowered:
            return reason
    return "error"


def task_name(env: SubtaskEnvelope) -> str:
    return f"{env.plugin}.{env.action}"


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kwargs: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.node = os.environ.get("EDGEFLEET_NODE_NAME", "")
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.subtasks = Counter(
            metric_names.SUBTASKS_RUN,
            "subtask attempts run on this node",
            ["plugin", "resource_class", "outcome"],
            **kwargs,
        )
        self.seconds = Histogram(
            metric_names.SUBTASK_SECONDS,
            "wall time of subtask attempts",
            ["plugin", "resource_class"],
            buckets=RUN_BUCKETS,
            **kwargs,
        )
        self.queue_wait = Histogram(
            metric_names.QUEUE_WAIT_SECONDS,
            "time from release (queued_at) to start of an attempt",
            ["plugin", "resource_class"],
            buckets=WAIT_BUCKETS,
            **kwargs,
        )
        self.failures = Counter(
            metric_names.SUBTASK_FAILURES,
            "failed subtask attempts by reason",
            ["plugin", "resource_class", "reason"],
            **kwargs,
        )
        self.in_flight = Gauge(
            metric_names.IN_FLIGHT,
            "subtasks running on this node",
            ["resource_class"],
            multiprocess_mode="livesum",
            **kwargs,
        )
        self.retries = Counter(
            metric_names.RETRIES, "attempts after a subtask's first", ["plugin", "resource_class"], **kwargs
        )
        self.redeliveries = Counter(
            metric_names.REDELIVERIES, "deliveries not run: duplicate, stale or cancelled", ["reason"], **kwargs
        )
        self.sandbox_starts = Counter(
            metric_names.SANDBOX_STARTS,
            "attempts by how their sandbox started: warm (a launcher started ahead) or cold",
            ["plugin", "start"],
            **kwargs,
        )
        self.subtasks_chained = Counter(
            metric_names.SUBTASKS_CHAINED,
            "subtasks a slot took from the backlog itself after its last one ended (no broker message)",
            ["resource_class"],
            **kwargs,
        )
        self.dropped = Counter(
            "edgefleet_worker_deliveries_dropped_total",
            "deliveries not run: duplicate, stale or cancelled",
            **kwargs,
        )
        # celery-exporter compatible
        self.celery_received = Counter(
            metric_names.CELERY_TASK_RECEIVED, "tasks received", ["name", "hostname"], **kwargs
        )
        self.celery_started = Counter(metric_names.CELERY_TASK_STARTED, "tasks started", ["name", "hostname"], **kwargs)
        self.celery_succeeded = Counter(
            metric_names.CELERY_TASK_SUCCEEDED, "tasks succeeded", ["name", "hostname"], **kwargs
        )
        self.celery_failed = Counter(
            metric_names.CELERY_TASK_FAILED, "tasks failed", ["name", "hostname", "exception"], **kwargs
        )
        self.celery_runtime = Histogram(
            metric_names.CELERY_TASK_RUNTIME, "task run time", ["name", "hostname"], buckets=RUN_BUCKETS, **kwargs
        )

    def hostname(self, env: SubtaskEnvelope) -> str:
        return f"{env.resource_class.value}@{self.node}"

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, kept: a subtask touches about ten of these, and prometheus_client
        checks and locks on every `labels` call. (The label values are bounded sets: plugins,
        classes, outcomes, reasons.)"""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def received(self, env: SubtaskEnvelope) -> None:
        self._child(self.celery_received, task_name(env), self.hostname(env)).inc()

    def chained(self, resource_class: str) -> None:
        self._child(self.subtasks_chained, resource_class).inc()

    def started(self, env: SubtaskEnvelope, queued_at: float | None, started_at: float | None) -> None:
        rc = env.resource_class.value
        self._child(self.celery_started, task_name(env), self.hostname(env)).inc()
        self._child(self.in_flight, rc).inc()
        if env.attempt > 1:
            self._child(self.retries, env.plugin, rc).inc()
        if queued_at is not None and started_at is not None:
            self._child(self.queue_wait, env.plugin, rc).observe(max(0.0, started_at - queued_at))

    def ended(self, env: SubtaskEnvelope) -> None:
        self._child(self.in_flight, env.resource_class.value).dec()

    def sandbox_started(self, env: SubtaskEnvelope, *, warm: bool) -> None:
        self._child(self.sandbox_starts, env.plugin, "warm" if warm else "cold").inc()

    def redelivered(self, reason: str) -> None:
        self.dropped.inc()
        self._child(self.redeliveries, reason).inc()

    def finished(self, env: SubtaskEnvelope, outcome: str, error: str = "") -> None:
        """An attempt's recorded end (succeeded, failed, cancelled)."""
        if outcome == "succeeded":
            self._child(self.celery_succeeded, task_name(env), self.hostname(env)).inc()
        elif outcome == "failed":
            reason = failure_reason(error)
            self._child(self.failures, env.plugin, env.resource_class.value, reason).inc()
            self._child(self.celery_failed, task_name(env), self.hostname(env), reason).inc()

    def observe(self, env: SubtaskEnvelope, outcome: str, seconds: float) -> None:
        rc = env.resource_class.value
        self._child(self.subtasks, env.plugin, rc, outcome).inc()
        self._child(self.seconds, env.plugin, rc).observe(seconds)
        self._child(self.celery_runtime, task_name(env), self.hostname(env)).observe(seconds)


def redelivery_reason(text: str) -> str:
    lowered = (text or "").lower()
    if "already running" in lowered or "running on" in lowered:
        return "duplicate"
    if "attempt" in lowered or "stale" in lowered:
        return "stale"
    if "cancel" in lowered:
        return "cancelled"
    return "other"


class NodeCollector(Collector):
    """The node supervisor's gauges, read at scrape."""

    def __init__(
        self,
        node: str,
        slots: Callable[[], dict[str, int]],
        workers_up: Callable[[], dict[str, bool]],
        gpu_usage: Callable[[], list[dict[str, Any]]],
    ) -> None:
        self.node = node
        self.slots = slots
        self.workers_up = workers_up
        self.gpu_usage = gpu_usage

    def collect(self) -> Iterator[GaugeMetricFamily]:
        node = self.node
        cpu = GaugeMetricFamily(metric_names.NODE_CPU, "CPU busy, 0..1", labels=["node"])
        cpu.add_metric([node], psutil.cpu_percent(interval=None) / 100.0)
        cores = GaugeMetricFamily(metric_names.NODE_CORES, "logical cores", labels=["node"])
        cores.add_metric([node], psutil.cpu_count(logical=True) or 1)
        vm = psutil.virtual_memory()
        mem_total = GaugeMetricFamily(metric_names.NODE_MEMORY_TOTAL, "memory", labels=["node"])
        mem_total.add_metric([node], vm.total)
        mem_avail = GaugeMetricFamily(metric_names.NODE_MEMORY_AVAILABLE, "memory available", labels=["node"])
        mem_avail.add_metric([node], vm.available)
        load = GaugeMetricFamily(metric_names.NODE_LOAD, "load average", labels=["node", "period"])
        try:
            for period, value in zip(("1m", "5m", "15m"), os.getloadavg(), strict=True):
                load.add_metric([node, period], value)
        except OSError:
            pass
        slots = GaugeMetricFamily(metric_names.NODE_SLOTS, "worker slots per class", labels=["node", "resource_class"])
        for rc, n in self.slots().items():
            slots.add_metric([node, rc], n)
        up = GaugeMetricFamily(metric_names.CELERY_WORKER_UP, "class worker process alive", labels=["hostname"])
        for hostname, alive in self.workers_up().items():
            up.add_metric([hostname], 1 if alive else 0)
        yield from (cpu, cores, mem_total, mem_avail, load, slots, up)
        usage = self.gpu_usage()
        if usage:
            util = GaugeMetricFamily(metric_names.NODE_GPU_UTIL, "GPU busy, 0..1", labels=["node", "gpu"])
            used = GaugeMetricFamily(metric_names.NODE_GPU_MEMORY_USED, "GPU memory used", labels=["node", "gpu"])
            total = GaugeMetricFamily(metric_names.NODE_GPU_MEMORY_TOTAL, "GPU memory", labels=["node", "gpu"])
            for i, gpu in enumerate(usage):
                label = f"{i}:{gpu.get('name', '')}"
                util.add_metric([node, label], float(gpu.get("utilization_percent", 0)) / 100.0)
                used.add_metric([node, label], float(gpu.get("memory_used_mb", 0)) * 1024 * 1024)
                total.add_metric([node, label], float(gpu.get("memory_total_mb", 0)) * 1024 * 1024)
            yield from (util, used, total)
