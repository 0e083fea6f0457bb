"""The router's Prometheus metrics: counters it owns plus fleet gauges read from Redis at scrape."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from edgefleet import metric_names
from edgefleet.schemas import ResourceClass
from edgefleet.store import JobStore


class FleetCollector(Collector):
    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        backlog = GaugeMetricFamily(metric_names.BACKLOG_DEPTH, "ready subtasks not yet released", labels=["resource_class"])
        queued = GaugeMetricFamily(metric_names.QUEUED_DEPTH, "released subtasks not yet claimed", labels=["resource_class"])
        for rc in ResourceClass:
            backlog.add_metric([rc.value], self.store.backlog_size(rc))
            queued.add_metric([rc.value], self.store.queued_size(rc))
        running = GaugeMetricFamily(metric_names.RUNNING_SUBTASKS, "subtasks holding a lease")
        running.add_metric([], self.store.redis.zcard(self.store.keys.running))
        nodes = GaugeMetricFamily(metric_names.LIVE_NODES, "worker nodes with a live heartbeat")
        nodes.add_metric([], len(self.store.live_nodes()))
        yield from (backlog, queued, running, nodes)


class RouterMetrics:
    def __init__(self, store: JobStore) -> None:
        self.registry = CollectorRegistry()
        self.submitted = Counter(
            metric_names.JOBS_SUBMITTED, "jobs accepted", ["priority"], registry=self.registry
        )
        self.released = Counter(metric_names.RELEASED, "subtasks sent to Celery", registry=self.registry)
        self.requeued = Counter(
            metric_names.REQUEUED, "subtasks given a new attempt after a lost lease", registry=self.registry
        )
        self.callbacks = Counter(
            metric_names.CALLBACKS, "completion callbacks", ["outcome"], registry=self.registry
        )
        self.registry.register(FleetCollector(store))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
