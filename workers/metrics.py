"""Worker metrics. Prefork children write to PROMETHEUS_MULTIPROC_DIR; the node serves the sum."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from edgefleet import metric_names
from edgefleet.schemas import SubtaskEnvelope


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kwargs = {"registry": registry} if registry is not None else {}
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
            buckets=(0.005, 0.02, 0.1, 0.5, 1, 2.5, 5, 15, 60, 300, 1800),
            **kwargs,
        )
        self.dropped = Counter(
            "edgefleet_worker_deliveries_dropped_total",
            "deliveries not run: duplicate, stale or cancelled",
            **kwargs,
        )

    def observe(self, env: SubtaskEnvelope, outcome: str, seconds: float) -> None:
        self.subtasks.labels(env.plugin, env.resource_class.value, outcome).inc()
        self.seconds.labels(env.plugin, env.resource_class.value).observe(seconds)
