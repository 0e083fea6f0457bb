"""The feedback loop: metrics in, target depths and priority weights out.

Every `feedback_interval` seconds it reads a few figures per resource class:

* `slots` - live worker slots (how many subtasks the fleet runs at once);
* `run_seconds` - mean run time of a subtask;
* `wait_seconds` - mean time a released subtask waited in its Celery queue;
* `interactive_p95` - p95 latency of interactive jobs.

From a Prometheus server (`settings.prometheus_url`, its `/api/v1/query`) when
one is set and answers, else from Redis (live nodes' heartbeats and what the
router's `FinishWatcher` saw finish). Where it read them, and why it fell back,
goes to the Redis hash `<prefix>:scheduler:feedback` {source, reason, at,
figures, targets, changes (the last 20)} for `GET /v1/scheduler`.

Target depth (Little's law: items in the queue = arrival rate x time spent
there). To keep every slot busy the queue must hold the subtasks that start
while a released one travels to a worker: about `slots x (1 + wait/run)`. The
ratio is capped at 1, so the target stays within [slots, 2 x slots]: enough to
never starve a slot, small enough that a newly arrived interactive subtask is
next. Without run-time figures the ratio is taken as 0.5.

Interactive weight: raised 25 % per round (up to 4x its first value) while the
interactive p95 exceeds `settings.interactive_p95_objective`, lowered back 10 %
per round once it is under half the objective.

Both go through the release scheduler's state (`SchedulerState.set_target_depth`,
`set_weights`), which logs each change with its reason.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import httpx

from edgefleet.router.metrics import FinishWatcher, RouterMetrics, SubmitTimer
from edgefleet.scheduling.state import SchedulerState
from edgefleet.schemas import ResourceClass
from edgefleet.settings import Settings
from edgefleet.store import JobStore

log = logging.getLogger(__name__)

DEFAULT_WAIT_RATIO = 0.5
MAX_WAIT_RATIO = 1.0
WEIGHT_STEP_UP = 1.25
WEIGHT_STEP_DOWN = 0.9
WEIGHT_MAX_FACTOR = 4.0
RECENT_CHANGES = 20

PROM_QUERIES = {
    "slots": "sum by (resource_class) (edgefleet_node_slots)",
    "run_seconds": (
        "sum by (resource_class) (rate(edgefleet_worker_subtask_seconds_sum[1m]))"
        " / sum by (resource_class) (rate(edgefleet_worker_subtask_seconds_count[1m]))"
    ),
    "wait_seconds": (
        "sum by (resource_class) (rate(edgefleet_worker_queue_wait_seconds_sum[1m]))"
        " / sum by (resource_class) (rate(edgefleet_worker_queue_wait_seconds_count[1m]))"
    ),
    "interactive_p95": (
        'histogram_quantile(0.95, sum by (le) (rate(edgefleet_job_duration_seconds_bucket{priority="interactive"}[5m])))'
    ),
}


class PrometheusUnavailable(Exception):
    pass


def target_for(slots: int, run: float | None, wait: float | None) -> int:
    if slots <= 0:
        return 0
    ratio = wait / run if run and run > 0 and wait is not None else DEFAULT_WAIT_RATIO
    ratio = min(MAX_WAIT_RATIO, max(0.0, ratio))
    return max(1, min(2 * slots, math.ceil(slots * (1 + ratio))))


class FeedbackLoop:
    def __init__(
        self,
        store: JobStore,
        scheduler: SchedulerState,
        settings: Settings,
        metrics: RouterMetrics,
        watcher: FinishWatcher,
        is_leader: Callable[[], bool] = lambda: True,
    ) -> None:
        self.is_leader = is_leader
        self.store = store
        self.scheduler = scheduler
        self.settings = settings
        self.metrics = metrics
        self.watcher = watcher
        self.targets: dict[str, int] = {rc.value: n for rc, n in settings.target_depth.items()}
        self._weight_base: float | None = None
        self.recent_changes: list[dict[str, Any]] = []  # the last RECENT_CHANGES, oldest first
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- thread -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ef-feedback", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.feedback_interval):
            if not self.is_leader():
                continue  # one router steers: the one that holds the release lease
            try:
                self.round()
            except Exception:
                log.exception("feedback round failed")

    # --- figures ----------------------------------------------------------------------

    def read_figures(self) -> tuple[dict[str, Any], str, str]:
        """(figures, source, reason)."""
        if self.settings.prometheus_url:
            try:
                return self._from_prometheus(), "prometheus", f"read from {self.settings.prometheus_url}"
            except PrometheusUnavailable as exc:
                reason = f"fell back to Redis: {exc}"
                return self._from_redis(), "redis", reason
        return self._from_redis(), "redis", "no prometheus_url configured"

    def _query(self, client: httpx.Client, expr: str) -> list[dict[str, Any]]:
        url = self.settings.prometheus_url.rstrip("/") + "/api/v1/query"  # type: ignore[union-attr]
        try:
            response = client.get(url, params={"query": expr})
        except httpx.HTTPError as exc:
            raise PrometheusUnavailable(
                f"Prometheus unreachable at {self.settings.prometheus_url} ({type(exc).__name__})"
            ) from exc
        if response.status_code != 200:
            raise PrometheusUnavailable(f"Prometheus answered HTTP {response.status_code}")
        body = response.json()
        if body.get("status") != "success":
            raise PrometheusUnavailable(f"Prometheus query failed: {body.get('error', body)}")
        return cast(list[dict[str, Any]], body["data"]["result"])

    @staticmethod
    def _by_class(result: list[dict[str, Any]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for series in result:
            value = float(series["value"][1])
            if math.isfinite(value):
                out[series["metric"].get("resource_class", "")] = value
        return out

    def _from_prometheus(self) -> dict[str, Any]:
        with httpx.Client(timeout=min(5.0, max(1.0, self.settings.feedback_interval))) as client:
            slots = self._by_class(self._query(client, PROM_QUERIES["slots"]))
            if not slots:
                raise PrometheusUnavailable(
                    "Prometheus has no edgefleet_node_slots series (no worker node scraped yet)"
                )
            run = self._by_class(self._query(client, PROM_QUERIES["run_seconds"]))
            wait = self._by_class(self._query(client, PROM_QUERIES["wait_seconds"]))
            p95_result = self._by_class(self._query(client, PROM_QUERIES["interactive_p95"]))
        return {
            "slots": {k: int(v) for k, v in slots.items()},
            "run_seconds": run,
            "wait_seconds": wait,
            "interactive_p95": next(iter(p95_result.values()), None),
        }

    def _from_redis(self) -> dict[str, Any]:
        slots: dict[str, int] = {}
        for node in self.store.nodes.live_nodes():
            for rc in node.classes:
                if rc is ResourceClass.cpu:
                    n = self.settings.cpu_concurrency or node.cores
                elif rc is ResourceClass.io:
                    n = self.settings.io_concurrency
                else:
                    n = self.settings.gpu_concurrency or max(1, len(node.gpus))
                slots[rc.value] = slots.get(rc.value, 0) + n
        seen = self.watcher.snapshot()
        return {
            "slots": slots,
            "run_seconds": seen["run_seconds"],
            "wait_seconds": seen["wait_seconds"],
            "interactive_p95": seen["interactive_p95"],
        }

    # --- decisions --------------------------------------------------------------------

    def round(self) -> dict[str, Any]:
        figures, source, reason = self.read_figures()
        changes: list[dict[str, Any]] = []
        for rc in ResourceClass:
            slots = int(figures["slots"].get(rc.value, 0))
            self.metrics.feedback_slots.labels(resource_class=rc.value).set(slots)
            if slots <= 0:
                continue  # no live worker serves it: leave its target alone
            run, wait = figures["run_seconds"].get(rc.value), figures["wait_seconds"].get(rc.value)
            target = target_for(slots, run, wait)
            if target != self.targets.get(rc.value):
                why = (
                    f"{source}: {slots} slots, run {run if run is not None else '?'} s, "
                    f"wait {wait if wait is not None else '?'} s -> target {target}"
                )
                applied = self._set_target(rc, target, why)
                changes.append(
                    {
                        "kind": "target_depth",
                        "resource_class": rc.value,
                        "from": self.targets.get(rc.value),
                        "to": target,
                        "reason": why,
                        "applied": applied,
                    }
                )
                self.targets[rc.value] = target
            self.metrics.target_depth.labels(resource_class=rc.value).set(self.targets[rc.value])
        p95 = figures.get("interactive_p95")
        if p95 is not None:
            self.metrics.feedback_p95.set(p95)
            change = self._adjust_interactive_weight(p95)
            if change:
                changes.append(change)
        for name in ("prometheus", "redis"):
            self.metrics.feedback_source.labels(source=name).set(1 if name == source else 0)
        self.metrics.feedback_rounds.labels(source=source).inc()
        for change in changes:
            change["at"] = time.time()
            self.metrics.feedback_changes.labels(kind=change["kind"]).inc()
            log.info(
                "feedback change", extra={k: v for k, v in change.items() if k != "kind"} | {"change": change["kind"]}
            )
        record = {
            "source": source,
            "reason": reason,
            "at": repr(time.time()),
            "figures": json.dumps(figures),
            "targets": json.dumps(self.targets),
        }
        if changes:
            self.recent_changes = (self.recent_changes + changes)[-RECENT_CHANGES:]
            record["changes"] = json.dumps(self.recent_changes)
        self.scheduler.record_feedback(record)
        return {"source": source, "reason": reason, "figures": figures, "changes": changes}

    def _set_target(self, rc: ResourceClass, target: int, why: str) -> bool:
        self.scheduler.set_target_depth(rc, target, why)
        return True

    def _adjust_interactive_weight(self, p95: float) -> dict[str, Any] | None:
        current = self.scheduler.weights().get("interactive")
        if not isinstance(current, (int, float)) or current <= 0:
            return None
        if self._weight_base is None:
            self._weight_base = float(current)
        objective = self.settings.interactive_p95_objective
        if p95 > objective:
            new = min(current * WEIGHT_STEP_UP, self._weight_base * WEIGHT_MAX_FACTOR)
            why = f"interactive p95 {p95:.3f} s above objective {objective:g} s"
        elif p95 < objective / 2 and current > self._weight_base:
            new = max(self._weight_base, current * WEIGHT_STEP_DOWN)
            why = f"interactive p95 {p95:.3f} s well under objective {objective:g} s"
        else:
            return None
        new = round(new, 4)
        if new == current:
            return None
        self.scheduler.set_weights({"interactive": new}, why)
        self.metrics.weight.labels(name="interactive").set(new)
        return {"kind": "weight", "name": "interactive", "from": current, "to": new, "reason": why, "applied": True}


def start_feedback(
    app: Any,
    store: JobStore,
    scheduler: SchedulerState,
    settings: Settings,
    metrics: RouterMetrics,
    is_leader: Callable[[], bool],
) -> FeedbackLoop:
    """Start the finish watcher and the feedback loop, and time POST /v1/jobs (one call from the lifespan)."""
    if getattr(app, "middleware_stack", None) is not None:
        app.middleware_stack = SubmitTimer(app.middleware_stack, metrics.submit_seconds)
    metrics.watcher.start()
    loop = FeedbackLoop(store, scheduler, settings, metrics, metrics.watcher, is_leader)
    loop.start()
    return loop
