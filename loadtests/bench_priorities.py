"""Priorities under load: plain Celery FIFO, Celery's Redis priorities and edgefleet's scheduler.

One run, one embedded redis-server, one router and one worker node (cpu class, prefork, plus
its express slot for interactive work, --express-slots); every scenario runs these ways on them:

* fifo        raw Celery: `send_task("edgefleet.bench_sleep")` to the `cpu` queue, all priority 0
* celery-prio the same with `MESSAGE_PRIORITY` per class (interactive 0, batch 8), fixed at send time
* celery-lane celery-prio, with interactive tasks sent to `cpu.express`, which the node's express
              slot serves: the same slots edgefleet has (scenarios 1 and 2 only)
* edgefleet   one-step `sleep` jobs through the router's HTTP API with `priority` (and
              `deadline_s`, one bearer token per tenant); they wait in the backlog and the
              release scheduler lets them into Celery under the class's target depth

`edgefleet.bench_sleep(seconds, label, key)` (loadtests/bench_tasks.py) is the baseline task: it
sleeps and appends its start/finish times to a Redis list. An edgefleet subtask additionally runs
in a sandboxed child process, so each way's capacity (subtasks per second) is measured first and
the loads of scenario 2 are set as fractions of it.

Scenarios (sizes scale with the options; the issue's full sizes are 2,000 x 200 ms etc.):
1. flood     a batch flood; interactive one-step jobs every --interactive-every s for --window s
2. starve    a batch backlog plus interactive load at --starve-load x capacity for --window s;
             edgefleet runs its default weights with batch_min_share = --min-batch-share
3. fair      tenant A floods --fair-flood batch jobs, then tenant B submits --fair-b; B's wait
4. deadline  a batch job with deadline_s=--deadline into its own tenant's backlog of ~3 x
             deadline of work;
             then (edgefleet only) waiting work is reordered by a weight change

Latency = submit (client clock, before the call) -> finish; wait = submit -> start of the run.
Everything left over after a scenario is purged (Celery lists deleted, edgefleet jobs cancelled).

    python loadtests/bench_priorities.py            # ~8 minutes on 2 cores
    python loadtests/bench_priorities.py --scenarios flood,fair --window 30
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgefleet.celery_app import EXPRESS_SUFFIX, MESSAGE_PRIORITY, create_celery
from edgefleet.cli.embedded_redis import EmbeddedRedis, free_port
from edgefleet.scheduling.state import SchedulerState
from edgefleet.schemas import JobState, PriorityClass, ResourceClass
from edgefleet.settings import Settings
from edgefleet.store import JobStore
from loadtests.harness import healthy as _healthy
from loadtests.harness import start, stop, wait_for

BENCH_SLEEP = "edgefleet.bench_sleep"  # the baseline task, loadtests/bench_tasks.py
CPU = ResourceClass.cpu
WAYS = ("fifo", "celery-prio", "celery-lane", "edgefleet")
# celery-lane differs from celery-prio only in where interactive work goes.
INTERACTIVE_SCENARIOS = ("flood", "starve")
SCENARIOS = ("flood", "starve", "fair", "deadline")
TENANTS = ("cal", "s1-batch", "s1-int", "s2-batch", "s2-int", "s3-A", "s3-B", "s4-A")
ADMIN_TOKEN = "bench-admin"
DONE_STATES = {JobState.succeeded, JobState.failed, JobState.cancelled}


def token_of(tenant: str) -> str:
    return f"bench-{tenant}"


# --- one submitted unit of work ------------------------------------------------------------


@dataclass
class Item:
    kind: str  # "interactive" | "batch"
    tenant: str
    submitted: float
    handle: str  # Celery label or edgefleet job id
    started: float | None = None
    finished: float | None = None
    deadline_s: float | None = None

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.submitted

    @property
    def wait(self) -> float | None:
        return None if self.started is None else self.started - self.submitted


@dataclass
class Run:
    """What one scenario run submitted, filled in with start/finish times at the end."""

    items: list[Item] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, item: Item) -> Item:
        with self.lock:
            self.items.append(item)
        return item

    def of(self, kind: str | None = None, tenant: str | None = None) -> list[Item]:
        with self.lock:
            return [
                i for i in self.items if (kind is None or i.kind == kind) and (tenant is None or i.tenant == tenant)
            ]


# --- the ways ------------------------------------------------------------------------------


class CeleryWay:
    """Raw Celery: the baseline task straight into the `cpu` queue."""

    def __init__(self, name: str, app: Any, client: redis.Redis, use_priorities: bool, lane: bool = False) -> None:
        self.name = name
        self.app = app
        self.client = client
        self.use_priorities = use_priorities
        self.lane = lane
        self.key = ""
        self._send_lock = threading.Lock()
        self._seen: dict[str, dict[str, float]] = {}
        self._read = 0

    def begin(self) -> None:
        self.key = f"bench:prio:{uuid.uuid4().hex[:8]}"
        self._seen, self._read = {}, 0

    def submit(self, run: Run, kind: str, tenant: str, seconds: float, deadline_s: float | None = None) -> Item:
        label = uuid.uuid4().hex[:12]
        priority = MESSAGE_PRIORITY[PriorityClass(kind)] if self.use_priorities else 0
        with self._send_lock:
            submitted = time.time()
            # celery-lane: interactive tasks to the node's express queue, served by the same
            # express slot that edgefleet's interactive subtasks get (a dedicated Celery worker).
            queue = "cpu" + EXPRESS_SUFFIX if self.lane and kind == "interactive" else "cpu"
            self.app.send_task(BENCH_SLEEP, args=[seconds, label, self.key], queue=queue, priority=priority)
        return run.add(Item(kind, tenant, submitted, label, deadline_s=deadline_s))

    def submit_many(self, run: Run, n: int, kind: str, tenant: str, seconds: float) -> None:
        for _ in range(n):
            self.submit(run, kind, tenant, seconds)

    def refresh(self, run: Run) -> None:
        new = self.client.lrange(self.key, self._read, -1)
        self._read += len(new)
        for raw in new:
            rec = json.loads(raw)
            self._seen[rec["label"]] = rec
        for item in run.items:
            rec = self._seen.get(item.handle)
            if rec:
                item.started, item.finished = rec["start"], rec["end"]
        self._fill_started(run)

    def _fill_started(self, run: Run) -> None:
        """The baseline task records only when it ends; until then a started item is unknown."""

    def purge(self, run: Run) -> None:
        self.client.delete(*celery_queue_keys())
        wait_for(lambda: self.client.hlen("unacked") == 0, 120, f"{self.name}: in-flight tasks to finish")
        self.refresh(run)


class EdgefleetWay:
    """One-step `sleep` jobs through the router's HTTP API."""

    name = "edgefleet"

    def __init__(self, url: str, store: JobStore, client: redis.Redis) -> None:
        self.url = url
        self.store = store
        self.scheduler = SchedulerState.of(store)
        self.client = client
        self._local = threading.local()

    def begin(self) -> None:
        pass

    def _http(self, tenant: str) -> httpx.Client:
        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        if tenant not in clients:
            clients[tenant] = httpx.Client(
                base_url=self.url, headers={"Authorization": f"Bearer {token_of(tenant)}"}, timeout=60
            )
        return clients[tenant]

    def submit(self, run: Run, kind: str, tenant: str, seconds: float, deadline_s: float | None = None) -> Item:
        body: dict[str, Any] = {
            "steps": [{"id": "s", "plugin": "sleep", "action": "sleep", "args": {"seconds": seconds}}],
            "priority": kind,
            "name": f"bench-{kind}",
        }
        if deadline_s is not None:
            body["deadline_s"] = deadline_s
        http = self._http(tenant)
        submitted = time.time()
        response = http.post("/v1/jobs", json=body)
        response.raise_for_status()
        return run.add(Item(kind, tenant, submitted, response.json()["id"], deadline_s=deadline_s))

    def submit_many(self, run: Run, n: int, kind: str, tenant: str, seconds: float, threads: int = 8) -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda _: self.submit(run, kind, tenant, seconds), range(n)))

    def refresh(self, run: Run, only: list[Item] | None = None) -> None:
        for item in only if only is not None else run.items:
            if item.finished is not None:
                continue
            status = self.store.get_job(item.handle)
            if status is None or not status.subtasks:
                continue
            item.started = status.subtasks[0].started_at
            if status.state is JobState.succeeded:
                item.finished = status.finished_at

    def purge(self, run: Run) -> None:
        self.refresh(run)
        for item in run.items:
            if item.finished is None:
                self.store.cancel_job(item.handle)

        def drained() -> bool:
            return (
                self.scheduler.backlog_size(CPU) == 0
                and self.scheduler.queued_size(CPU) == 0
                and self.store.attempts.running_count() == 0
                and sum(self.client.llen(k) for k in celery_queue_keys()) == 0
                and self.client.hlen("unacked") == 0
            )

        wait_for(drained, 180, "edgefleet: cancelled work to drain")
        self.refresh(run)


def celery_queue_keys() -> list[str]:
    # kombu's Redis priority lists for `cpu` and `cpu.express` with priority_steps 0..9 and sep ":".
    return [q + suffix for q in ("cpu", "cpu" + EXPRESS_SUFFIX) for suffix in ["", *(f":{p}" for p in range(1, 10))]]


# --- statistics ---------------------------------------------------------------------------


def pct(items: list[Item], q: float, attr: str = "latency", now: float | None = None) -> str:
    """The q-quantile of latency/wait; an item not done counts as (now - submitted), shown '>='."""
    if not items:
        return "-"
    now = now or time.time()
    values = []
    for item in items:
        v = getattr(item, attr)
        values.append((v, False) if v is not None else (now - item.submitted, True))
    values.sort()
    v, censored = values[min(len(values) - 1, int(q * len(values)))]
    return f"{'≥' if censored else ''}{v:.2f}"


def pct_value(items: list[Item], q: float, attr: str = "latency", now: float | None = None) -> float | None:
    text = pct(items, q, attr, now)
    return None if text == "-" else float(text.lstrip("≥"))


def wait_until(cond: Callable[[], bool], timeout: float, poll: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll)
    return cond()


# --- the benchmark -------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, ways: dict[str, Any], store: JobStore) -> None:
        self.args = args
        self.ways = ways
        self.store = store
        self.scheduler = SchedulerState.of(store)
        self.capacity: dict[str, float] = {}
        self.unloaded: dict[str, dict[str, float | None]] = {}
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.base_weights = self.scheduler.weights()

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def path_of(self, way: str) -> str:
        return "edgefleet" if way == "edgefleet" else "celery"

    def set_weights(self, changes: dict[str, float], reason: str) -> None:
        self.scheduler.set_weights({**self.base_weights, **changes}, f"bench_priorities: {reason}")

    def collect(self, way: Any, run: Run, items: list[Item] | None = None) -> None:
        if isinstance(way, EdgefleetWay):
            way.refresh(run, items)
        else:
            way.refresh(run)

    def paced(
        self, way: Any, run: Run, every: float, until: float, kind: str, tenant: str, seconds: float
    ) -> threading.Thread:
        """Submit one `kind` job every `every` seconds until `until` (time.time()), in a thread."""

        def loop() -> None:
            n = 0
            t0 = time.time()
            while True:
                due = t0 + n * every
                if due >= until:
                    return
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
                way.submit(run, kind, tenant, seconds)
                n += 1

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread

    # --- calibration ----------------------------------------------------------------------

    def warm(self) -> None:
        """First runs pay one-time costs (imports, a cold sandbox launcher in each worker
        process, the express slot's included); none of that belongs in a measurement."""
        for name in ("fifo", "celery-lane", "edgefleet"):
            way = self.ways[name]
            way.begin()
            run = Run()
            way.submit_many(run, 8, "batch", "cal", 0.0)
            for _ in range(4):
                way.submit(run, "interactive", "cal", 0.0)
                time.sleep(0.1)
            self.wait_done(way, run, run.items, 120)
            way.purge(run)

    def wait_done(self, way: Any, run: Run, items: list[Item], timeout: float) -> bool:
        def done() -> bool:
            self.collect(way, run, items)
            return all(i.finished is not None for i in items)

        return wait_until(done, timeout)

    def calibrate(self) -> None:
        a = self.args
        for name in ("fifo", "edgefleet"):
            way, path = self.ways[name], self.path_of(name)
            way.begin()
            run = Run()
            for _ in range(a.unloaded_probes):
                item = way.submit(run, "interactive", "cal", a.interactive_seconds)
                self.wait_done(way, run, [item], 60)
                time.sleep(max(0.0, a.interactive_every - (time.time() - item.submitted)))
            inter = run.of("interactive")
            way.submit_many(run, a.calibrate_batch, "batch", "cal", a.batch_seconds)
            batch = run.of("batch")
            self.wait_done(way, run, batch, 600)
            ends = sorted(i.finished for i in batch if i.finished)
            capacity = (len(ends) - 1) / (ends[-1] - ends[0])
            self.capacity[path] = capacity
            self.unloaded[path] = {"p50": pct_value(inter, 0.5), "p95": pct_value(inter, 0.95)}
            way.purge(run)
            self.log(
                f"calibrated {path}: unloaded interactive p50 {pct(inter, 0.5)} s p95 {pct(inter, 0.95)} s; "
                f"capacity {capacity:.1f} batch subtasks/s ({a.batch_seconds:g} s each)"
            )
            self.rows.append(
                {
                    "scenario": "unloaded",
                    "way": path,
                    "int_p50": pct(inter, 0.5),
                    "int_p95": pct(inter, 0.95),
                    "batch_tput": f"{capacity:.2f}",
                    "batch_share": "-",
                    "b_wait": "-",
                    "deadline": "-",
                }
            )

    # --- scenario 1: interactive under a batch flood ---------------------------------------

    def _begin(self, name: str) -> tuple[argparse.Namespace, Any, float, Run]:
        """A scenario's start on one way: its options, the way, that path's capacity, a fresh run."""
        way = self.ways[name]
        way.begin()
        return self.args, way, self.capacity[self.path_of(name)], Run()

    def flood(self, name: str) -> None:
        a, way, cap, run = self._begin(name)
        if name == "edgefleet":
            self.set_weights({}, "flood: default weights")
        n = math.ceil(cap * (a.window + 5) * 1.3) if a.flood is None else a.flood
        way.submit_many(run, n, "batch", "s1-batch", a.batch_seconds)
        w0 = time.time()
        w1 = w0 + a.window
        sender = self.paced(way, run, a.interactive_every, w1, "interactive", "s1-int", a.interactive_seconds)
        time.sleep(max(0.0, w1 - time.time()))
        sender.join()
        inter = run.of("interactive")
        self.wait_done(way, run, inter, a.drain)
        now = time.time()
        self.collect(way, run)
        way.purge(run)
        batch = run.of("batch")
        done_in_window = sum(1 for i in batch if i.finished is not None and w0 <= i.finished <= w1)
        tput = done_in_window / (w1 - w0)
        self.rows.append(
            {
                "scenario": "1 flood",
                "way": name,
                "int_p50": pct(inter, 0.5, now=now),
                "int_p95": pct(inter, 0.95, now=now),
                "batch_tput": f"{tput:.2f}",
                "batch_share": "-",
                "b_wait": "-",
                "deadline": "-",
                "_p95": pct_value(inter, 0.95, now=now),
                "_tput": tput,
                "_n": n,
                "_inter": len(inter),
            }
        )
        self.log(
            f"flood/{name}: {n} batch, {len(inter)} interactive; p95 {pct(inter, 0.95, now=now)} s, batch {tput:.2f}/s"
        )

    # --- scenario 2: starvation ------------------------------------------------------------

    def starve(self, name: str) -> None:
        a, way, cap, run = self._begin(name)
        if name == "edgefleet":
            # Default weights (interactive 600 virtual s ahead of batch) plus the minimum share:
            # while batch waits, at least that fraction of releases goes to it.
            self.set_weights({"batch_min_share": a.min_batch_share}, "starve: batch minimum share")
            self.notes.append(f"starve/edgefleet weights: defaults, batch_min_share {a.min_batch_share:g}")
        n = math.ceil(cap * (a.window + 10) * 1.3)
        # The interactive stream starts with the backlog's submission, so that no way gets a
        # head start of batch-only time (edgefleet's HTTP submission takes seconds).
        w0 = time.time()
        w1 = w0 + a.window
        rate = a.starve_load * cap
        sender = self.paced(way, run, 1.0 / rate, w1, "interactive", "s2-int", a.batch_seconds)
        way.submit_many(run, n, "batch", "s2-batch", a.batch_seconds)
        time.sleep(max(0.0, w1 - time.time()))
        sender.join()
        self.collect(way, run)
        finished_in_window = [i for i in run.items if i.finished is not None and w0 <= i.finished <= w1]
        batch_done = sum(1 for i in finished_in_window if i.kind == "batch")
        share = batch_done / max(1, len(finished_in_window))
        inter = run.of("interactive")
        self.wait_done(way, run, inter, a.drain)
        now = time.time()
        weights_after = self.scheduler.weights() if name == "edgefleet" else None
        way.purge(run)
        self.rows.append(
            {
                "scenario": "2 starve",
                "way": name,
                "int_p50": pct(inter, 0.5, now=now),
                "int_p95": pct(inter, 0.95, now=now),
                "batch_tput": f"{batch_done / a.window:.2f}",
                "batch_share": f"{share:.0%}",
                "b_wait": "-",
                "deadline": "-",
                "_share": share,
                "_p95": pct_value(inter, 0.95, now=now),
            }
        )
        if weights_after is not None:
            self.notes.append(
                f"starve/edgefleet weights at the end of the window (feedback loop): interactive {weights_after['interactive']:g}"
            )
            self.set_weights({}, "starve: restore")
        self.log(f"starve/{name}: interactive {rate:.1f}/s; batch share {share:.0%}; p95 {pct(inter, 0.95, now=now)} s")

    # --- scenario 3: fairness --------------------------------------------------------------

    def fair(self, name: str) -> None:
        a = self.args
        way = self.ways[name]
        way.begin()
        run = Run()
        if name == "edgefleet":
            self.set_weights({}, "fair: default weights")
        t0 = time.time()
        way.submit_many(run, a.fair_flood, "batch", "s3-A", a.batch_seconds)
        flood_s = time.time() - t0
        for _ in range(a.fair_b):
            way.submit(run, "batch", "s3-B", a.batch_seconds)
        b_items = run.of(tenant="s3-B")
        self.wait_done(way, run, b_items, a.max_wait)
        now = time.time()
        way.purge(run)
        med = pct(b_items, 0.5, "wait", now=now)
        self.rows.append(
            {
                "scenario": "3 fair",
                "way": name,
                "int_p50": "-",
                "int_p95": "-",
                "batch_tput": "-",
                "batch_share": "-",
                "b_wait": med,
                "deadline": "-",
                "_bwait": pct_value(b_items, 0.5, "wait", now=now),
            }
        )
        self.log(f"fair/{name}: A {a.fair_flood} (submitted in {flood_s:.1f} s), B {a.fair_b}; B median wait {med} s")

    # --- scenario 4: deadline, and reordering of waiting work ------------------------------

    def deadline(self, name: str) -> None:
        a, way, cap, run = self._begin(name)
        if name == "edgefleet":
            self.set_weights({}, "deadline: default weights")
        n = math.ceil(cap * a.deadline * 3) + 10
        way.submit_many(run, n, "batch", "s4-A", a.batch_seconds)
        # The same (flooding) tenant: only the deadline, not the fairness term, can move it ahead.
        item = way.submit(run, "batch", "s4-A", a.batch_seconds, deadline_s=a.deadline)
        self.wait_done(way, run, [item], a.deadline * 3)
        now = time.time()
        latency = item.latency
        met = latency is not None and latency <= a.deadline
        text = (
            f"{'met' if met else 'missed'} ({latency:.2f} s)"
            if latency is not None
            else f"missed (≥{now - item.submitted:.1f} s)"
        )
        if name == "edgefleet":
            self.reorder(way, run)
        way.purge(run)
        self.rows.append(
            {
                "scenario": "4 deadline",
                "way": name,
                "int_p50": "-",
                "int_p95": "-",
                "batch_tput": "-",
                "batch_share": "-",
                "b_wait": "-",
                "deadline": f"{text}, D={a.deadline:g} s, backlog {n}",
                "_met": met,
            }
        )
        self.log(f"deadline/{name}: backlog {n}; deadline job {text}")

    def reorder(self, way: EdgefleetWay, run: Run) -> None:
        """Waiting work is rescored when a weight changes (the feedback loop's lever): with the
        normal class's head start at 0, the flooding tenant's normal jobs rank behind its
        backlog (its own earlier jobs cost them fairness); raising the weight to 600 moves the
        already-waiting jobs to the front. (Normal, not
        interactive jobs: interactive ones leave the backlog through the express lane.)"""
        self.set_weights({"normal": 0.0}, "reorder: normal head start 0")
        items = [way.submit(run, "normal", "s4-A", self.args.batch_seconds) for _ in range(self.args.reorder_jobs)]
        time.sleep(1.0)
        ranks_before = self._ranks(items)
        backlog = self.scheduler.backlog_size(CPU)
        changed_at = time.time()
        self.set_weights({"normal": 600.0}, "reorder: normal head start raised to 600")
        ranks_after = self._ranks(items)
        self.wait_done(way, run, items, 60)
        waits = [i.started - changed_at for i in items if i.started is not None]
        self.notes.append(
            f"reorder/edgefleet: {len(items)} waiting normal jobs ranked {ranks_before} of {backlog} in the backlog; "
            f"after the weight change {ranks_after}; they started {min(waits):.2f}–{max(waits):.2f} s after it"
            if waits
            else f"reorder/edgefleet: ranks {ranks_before} -> {ranks_after}; not started within 60 s"
        )

    def _ranks(self, items: list[Item]) -> list[int | None]:
        order = [m.split("|", 1)[0] for m, _ in self.scheduler.backlog_order(CPU, limit=100_000)]
        pos = {job: n for n, job in enumerate(order)}
        return [pos.get(i.handle) for i in items]

    # --- report -----------------------------------------------------------------------------

    def table(self) -> str:
        head = [
            "scenario",
            "way",
            "interactive p50 s",
            "interactive p95 s",
            "batch /s",
            "batch share",
            "B median wait s",
            "deadline",
        ]
        keys = ["scenario", "way", "int_p50", "int_p95", "batch_tput", "batch_share", "b_wait", "deadline"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            lines.append("| " + " | ".join(str(row[k]) for k in keys) + " |")
        return "\n".join(lines)

    def ratios(self) -> list[str]:
        a = self.args
        rows = {(r["scenario"], r["way"]): r for r in self.rows}
        out = []

        def r(s: str, w: str, k: str) -> Any:
            return rows.get((s, w), {}).get(k)

        e_p95 = r("1 flood", "edgefleet", "_p95")
        if e_p95 is not None:
            base = self.unloaded["edgefleet"]["p95"]
            out.append(f"1 flood: edgefleet interactive p95 / its unloaded p95 = {e_p95 / base:.2f} (goal ≤ 1.5)")
            for w in ("celery-prio", "celery-lane"):
                prio = r("1 flood", w, "_p95")
                if prio:
                    out.append(f"1 flood: edgefleet interactive p95 / {w} p95 = {e_p95 / prio:.2f} (goal ≤ 1.1)")
            fifo_t, e_t = r("1 flood", "fifo", "_tput"), r("1 flood", "edgefleet", "_tput")
            if fifo_t:
                norm = (e_t / self.capacity["edgefleet"]) / (fifo_t / self.capacity["celery"])
                out.append(
                    f"1 flood: edgefleet batch throughput / fifo = {e_t / fifo_t:.2f} (goal ≥ 0.95); "
                    f"each as a fraction of its own path's capacity: {norm:.2f}"
                )
            for w in ("fifo", "celery-prio", "celery-lane"):
                p = r("1 flood", w, "_p95")
                u = self.unloaded[self.path_of(w)]["p95"]
                if p is not None and u:
                    out.append(f"1 flood: {w} interactive p95 / its unloaded p95 = {p / u:.2f}")
        share = r("2 starve", "edgefleet", "_share")
        if share is not None:
            p95 = r("2 starve", "edgefleet", "_p95")
            others = "; ".join(
                f"{w} {r('2 starve', w, '_share'):.0%}"
                for w in ("celery-prio", "celery-lane")
                if r("2 starve", w, "_share") is not None
            )
            out.append(
                f"2 starve: edgefleet batch share {share:.0%} (configured minimum {a.min_batch_share:.0%}); "
                f"{others}; edgefleet interactive p95 {p95:.2f} s (objective {a.objective:g} s)"
            )
        e_b = r("3 fair", "edgefleet", "_bwait")
        if e_b:
            for w in ("fifo", "celery-prio"):
                other = r("3 fair", w, "_bwait")
                if other:
                    out.append(f"3 fair: B median wait {w} / edgefleet = {other / e_b:.1f}x (goal ≥ 10)")
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of " + ",".join(SCENARIOS)
    )
    parser.add_argument("--cpu-concurrency", type=int, default=2, help="worker slots (prefork children)")
    parser.add_argument(
        "--express-slots",
        type=int,
        default=1,
        help="the node's express slots (interactive only); celery-lane sends interactive tasks there",
    )
    parser.add_argument(
        "--batch-seconds", type=float, default=0.2, help="run time of a batch subtask (the issue's size)"
    )
    parser.add_argument("--interactive-seconds", type=float, default=0.05, help="run time of an interactive subtask")
    parser.add_argument("--interactive-every", type=float, default=0.5, help="scenario 1: interactive arrival period")
    parser.add_argument("--window", type=float, default=20.0, help="scenarios 1, 2: seconds of interactive load")
    parser.add_argument(
        "--flood",
        type=int,
        default=None,
        help="scenario 1: batch flood size (default: 1.3 x what the way can run in the window; issue: 2000)",
    )
    parser.add_argument("--starve-load", type=float, default=0.9, help="scenario 2: interactive demand / capacity")
    parser.add_argument(
        "--min-batch-share",
        type=float,
        default=0.15,
        help="scenario 2: edgefleet's batch_min_share; with --starve-load L, interactive gets 1 - share, "
        "so L + share > 1 makes its queue grow for the whole window",
    )
    parser.add_argument("--fair-flood", type=int, default=400, help="scenario 3: tenant A's batch jobs (issue: 5000)")
    parser.add_argument("--fair-b", type=int, default=8, help="scenario 3: tenant B's batch jobs (issue: 50)")
    parser.add_argument("--deadline", type=float, default=5.0, help="scenario 4: deadline_s of the deadline job")
    parser.add_argument(
        "--reorder-jobs", type=int, default=4, help="scenario 4: waiting jobs reordered by a weight change"
    )
    parser.add_argument(
        "--unloaded-probes", type=int, default=12, help="calibration: interactive jobs on an idle fleet"
    )
    parser.add_argument("--calibrate-batch", type=int, default=60, help="calibration: batch subtasks for the capacity")
    parser.add_argument(
        "--drain", type=float, default=20.0, help="seconds to let interactive work finish after a window"
    )
    parser.add_argument("--max-wait", type=float, default=120.0, help="scenario 3: longest wait for tenant B")
    parser.add_argument("--objective", type=float, default=2.0, help="interactive p95 objective, s (router setting)")
    parser.add_argument("--sandbox", choices=["auto", "process"], default="auto", help="edgefleet worker sandbox")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")

    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-prio-"))
    server = EmbeddedRedis(workdir / "redis", port=free_port())
    server.start()
    port = free_port()
    tokens = {token_of(t): {"scopes": ["submit", "read"], "tenant": t} for t in TENANTS}
    tokens[ADMIN_TOKEN] = {"scopes": ["admin"], "tenant": "bench"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env.update(
        PYTHONPATH=str(ROOT),
        EDGEFLEET_REDIS_URL=server.url,
        EDGEFLEET_TOKENS=json.dumps(tokens),
        EDGEFLEET_ROUTER_PORT=str(port),
        EDGEFLEET_DATA_DIR=str(workdir / "data"),
        EDGEFLEET_WORKER_METRICS_PORT="0",
        EDGEFLEET_CPU_CONCURRENCY=str(args.cpu_concurrency),
        EDGEFLEET_EXPRESS_SLOTS=str(args.express_slots),
        EDGEFLEET_INTERACTIVE_P95_OBJECTIVE=str(args.objective),
        EDGEFLEET_SANDBOX=args.sandbox,
        EDGEFLEET_LOG_LEVEL="WARNING",
        # The raw-Celery baseline task runs on the same worker slots as edgefleet's subtasks.
        EDGEFLEET_WORKER_TASK_MODULES=json.dumps(["loadtests.bench_tasks"]),
    )
    router = start([sys.executable, "-m", "edgefleet", "router"], env, workdir / "router.log")
    node = start(
        [sys.executable, "-m", "edgefleet", "worker", "--node-name", "bench", "--classes", "cpu"],
        env,
        workdir / "node.log",
    )
    url = f"http://127.0.0.1:{port}"
    client = redis.Redis.from_url(server.url, decode_responses=True)
    started = time.time()
    try:
        wait_for(lambda: _healthy(url), 60, "router")
        store = JobStore.from_url(server.url)
        wait_for(lambda: any(n.name == "bench" for n in store.nodes.live_nodes()), 60, "worker node")
        settings = Settings(redis_url=server.url)
        app = create_celery(settings, main="bench")
        ways = {
            "fifo": CeleryWay("fifo", app, client, use_priorities=False),
            "celery-prio": CeleryWay("celery-prio", app, client, use_priorities=True),
            "celery-lane": CeleryWay("celery-lane", app, client, use_priorities=True, lane=True),
            "edgefleet": EdgefleetWay(url, store, client),
        }
        bench = Bench(args, ways, store)
        bench.log(f"workdir {workdir}; scenarios {', '.join(chosen)}")
        bench.warm()
        bench.calibrate()
        for scenario in chosen:
            for way in WAYS:
                if way == "celery-lane" and (scenario not in INTERACTIVE_SCENARIOS or args.express_slots == 0):
                    continue
                getattr(bench, scenario)(way)
        scheduler = httpx.get(f"{url}/v1/scheduler", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
        bench.scheduler.set_weights(bench.base_weights, "bench_priorities: restore")
    finally:
        stop(node)
        stop(router)
        server.stop()
    print()
    print(
        f"sizes: {args.cpu_concurrency} cpu slots; batch {args.batch_seconds:g} s, interactive {args.interactive_seconds:g} s; "
        f"window {args.window:g} s; fair {args.fair_flood}+{args.fair_b}; deadline {args.deadline:g} s; "
        f"capacity celery {bench.capacity.get('celery', 0):.1f}/s, edgefleet {bench.capacity.get('edgefleet', 0):.1f}/s; "
        f"total {time.time() - started:.0f} s"
    )
    print(f"edgefleet target depth at the end: {scheduler.get('target_depth')}")
    print()
    print(bench.table())
    print()
    for line in bench.ratios() + bench.notes:
        print("- " + line)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": bench.rows,
                    "notes": bench.notes,
                    "capacity": bench.capacity,
                    "unloaded": bench.unloaded,
                    "args": vars(args) | {"json": str(args.json)},
                },
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
