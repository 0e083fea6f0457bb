"""Dispatch overhead: one-step `sleep 0` jobs through the router's HTTP API against raw Celery.

Both run in one script on the same redis-server and the same worker node, so the
ratio is meaningful on a noisy machine. Raw Celery sends `edgefleet.probe`
tasks (one Redis INCR each) to the same `cpu` queue; the router path submits
over HTTP, plans, stores, releases, claims, runs the sleep plugin and records
the result. Prints both rates, their ratio, the CPU each path spends per job, how long each
subtask held its worker slot (claim -> finish, from the job API) and the submit latency
percentiles.

`--isolation executor` runs a copy of `sleep` whose executors fork a process per subtask (the
built-in `sleep` says `isolation: shared`). `--batch` adds a row: the same jobs sent with `POST /v1/jobs:batch` (chunks of
`--batch-size`) by one client thread. `--router-workers N` runs `router --workers N`.
`--profile DIR` records py-spy profiles (raw collapsed stacks) of the router and of the
worker node (with its children) during the router runs, and prints their top frames.

    python loadtests/bench_dispatch.py --jobs 1000 --batch
    python loadtests/bench_dispatch.py --jobs 300 --batch --profile /tmp/profiles
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client.parser import text_string_to_metric_families

from edgefleet import metric_names
from edgefleet.celery_app import PROBE, create_celery
from edgefleet.scheduling.state import SchedulerState
from edgefleet.schemas import JobState, ResourceClass
from edgefleet.settings import Settings
from edgefleet.store import JobStore
from loadtests.harness import (
    TOKEN,
    BenchStack,
    NodeCpu,
    healthy,
    sleep_plugin_copy,
    start,
    tree_cpu,
    wait_for,
    wait_nodes,
)


def sleep_job(plugin: str) -> dict[str, Any]:
    """A one-step `sleep 0` job of `plugin` (the built-in `sleep`, or its forking copy)."""
    return {"steps": [{"id": "s", "plugin": plugin, "action": "sleep", "args": {"seconds": 0}}]}


# `--isolation executor`: a copy of `sleep` whose executors fork a process per subtask.
FORKED_SLEEP = "sleep_forked"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_raw_celery(settings: Settings, client: redis.Redis, n: int) -> float:
    app = create_celery(settings, main="bench")
    key = "bench:probe"
    client.delete(key)
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            app.send_task(PROBE, args=[key], queue="cpu", producer=producer)
    wait_for(lambda: int(client.get(key) or 0) >= n, 600, "raw celery")
    return n / (time.perf_counter() - started)


def in_slot_ms(url: str, job_ids: list[str]) -> list[float]:
    """Claim -> finish of each job's subtask, from the API: how long it held its worker slot."""
    spans: list[float] = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
        for job_id in job_ids:
            for subtask in http.get(f"/v1/jobs/{job_id}").json()["subtasks"]:
                if subtask.get("started_at") and subtask.get("finished_at"):
                    spans.append((subtask["finished_at"] - subtask["started_at"]) * 1000)
    return spans


def bench_router(
    url: str, store: JobStore, job: dict[str, Any], n: int, threads: int, job_ids: list[str]
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()

    def succeeded() -> int:
        return store.job_counts()[JobState.succeeded]

    base = succeeded()
    local = threading.local()

    def submit(_: int) -> None:
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"})
        t0 = time.perf_counter()
        response = local.http.post("/v1/jobs", json=job)
        elapsed = time.perf_counter() - t0
        response.raise_for_status()
        with lock:
            latencies.append(elapsed)
            job_ids.append(response.json()["id"])

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(submit, range(n)))
    wait_for(lambda: succeeded() - base >= n, 600, "router jobs")
    return n / (time.perf_counter() - started), latencies


def bench_router_batch(url: str, store: JobStore, job: dict[str, Any], n: int, batch_size: int) -> float:
    """n jobs through POST /v1/jobs:batch, `batch_size` per request, one client: submit -> all done."""
    base = store.job_counts()[JobState.succeeded]
    started = time.perf_counter()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as http:
        for offset in range(0, n, batch_size):
            size = min(batch_size, n - offset)
            response = http.post("/v1/jobs:batch", json={"jobs": [job] * size})
            response.raise_for_status()
            if response.json()["created"] != size:
                raise SystemExit(f"batch refused jobs: {response.text[:500]}")
    wait_for(lambda: store.job_counts()[JobState.succeeded] - base >= n, 600, "router batch jobs")
    return n / (time.perf_counter() - started)


class Profiler:
    """py-spy `record` on a process (and its children), raw collapsed stacks into `out`."""

    def __init__(self, out: Path, rate: int = 100) -> None:
        self.out = out
        self.rate = rate
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, pid: int, subprocesses: bool = False) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        target = self.out / f"{name}.txt"
        # --gil: only threads holding the GIL, i.e. running Python, not waiting on a lock or a socket.
        cmd = [
            spy,
            "record",
            "--format",
            "raw",
            "--gil",
            "--rate",
            str(self.rate),
            "--pid",
            str(pid),
            "--output",
            str(target),
        ]
        if subprocesses:
            cmd.append("--subprocesses")
        log = open(self.out / f"{name}.py-spy.log", "wb")  # noqa: SIM115 - py-spy holds it while it runs
        self.procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), target))

    def stop(self) -> None:
        for proc, _ in self.procs:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        for proc, target in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            if target.exists():
                print(f"\n--- {target.name}: top frames by own samples / by inclusive samples ---")
                print(top_frames(target))


def top_frames(path: Path, limit: int = 15) -> str:
    """The frames with the most own (leaf) samples and the most inclusive samples in a raw profile."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f.split(" (")[0] + " " + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] for f in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "(no samples)"
    rows = [f"{n / total:6.1%}  {frame}" for frame, n in own.most_common(limit)]
    rows.append("  inclusive:")
    rows += [f"{n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(limit)]
    return f"{total} samples\n" + "\n".join(rows)


class CpuMeter:
    """CPU seconds of the stack's processes, by part: a process tree's own time plus that of the
    children it reaped (so sandboxes that exited count), and this script's own (the raw Celery
    producer). On a shared box the wall-clock rates move with the neighbours' load; CPU per job
    is what a job costs, whoever else runs."""

    def __init__(self, trees: dict[str, int], node: NodeCpu | None = None) -> None:
        self.trees = trees
        # The node's cgroup, where the box allows one: it also counts sandbox executors that were
        # killed at recycling, whose CPU leaves the process tree's account with them.
        self.node = node if node is not None and node.folder is not None else None
        # CPU seconds per second each part spends with no work at all (heartbeats, polling loops):
        # subtracted over a run's length, so that a slower run is not charged more per job for it.
        self.idle: dict[str, float] = {}

    def read(self) -> dict[str, float]:
        out = {name: tree_cpu(pid) for name, pid in self.trees.items()}
        if self.node is not None:
            out["node"] = self.node.seconds()
            split = self.node.user_system()
            if split is not None:
                out["node user"], out["node system"] = split
        out["bench"] = time.process_time()
        out["t"] = time.perf_counter()
        return out

    def measure_idle(self, seconds: float) -> dict[str, float]:
        before = self.read()
        time.sleep(seconds)
        after = self.read()
        self.idle = {p: (after[p] - before[p]) / (after["t"] - before["t"]) for p in self.trees}
        return self.idle

    def spent(self, before: dict[str, float], after: dict[str, float], n: int, parts: list[str]) -> float:
        """Milliseconds of CPU per job in `parts`, beyond what they spend idle."""
        seconds = after["t"] - before["t"]
        return sum(after[p] - before[p] - self.idle.get(p, 0.0) * seconds for p in parts) * 1000 / n


class BusySlots:
    """The mean number of subtasks holding a lease (running), sampled every 50 ms while in use:
    below the node's slots while work waits, the node loses time between subtasks."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(self.store.attempts.running_count())

    def __enter__(self) -> BusySlots:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else 0.0


class Chained:
    """How many subtasks the node's slots took from the backlog themselves (slot chaining), from
    its `edgefleet_worker_subtasks_chained_total`; the rest came by a Celery message each."""

    def __init__(self, url: str) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as http:
            (self.metrics_url,) = [n["metrics_url"] for n in http.get("/v1/workers").json() if n["name"] == "bench"]

    def total(self) -> float:
        text = httpx.get(self.metrics_url, timeout=30).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == metric_names.SUBTASKS_CHAINED
        )


def target_depth(store: JobStore, settings: Settings) -> int:
    """The cpu class's target depth now (the feedback loop's, else the default)."""
    return SchedulerState.of(store).target_depths(settings.target_depth)[ResourceClass.cpu]


def start_router(stack: BenchStack, workers: int) -> int:
    """The router (with `--workers N` when N > 1); its pid."""
    cmd = [sys.executable, "-m", "edgefleet", "router"] + (["--workers", str(workers)] if workers > 1 else [])
    proc = start(cmd, stack.env, stack.workdir / "router.log")
    stack.procs.append(proc)
    wait_for(lambda: healthy(stack.url), 60, "router")
    return proc.pid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--client-threads", type=int, default=8)
    parser.add_argument("--cpu-concurrency", type=int, default=2)
    parser.add_argument("--batch", action="store_true", help="also submit the jobs with POST /v1/jobs:batch")
    parser.add_argument("--batch-size", type=int, default=500, help="jobs per batch request")
    parser.add_argument("--router-workers", type=int, default=1, help="edgefleet router --workers N")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy profiles of router and node into DIR")
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument(
        "--profile-part",
        choices=["both", "single", "batch"],
        default="both",
        help="which router run(s) the profiles cover",
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="EDGEFLEET_NAME=VALUE",
        help="an environment setting for the router and node (repeatable), e.g. to try another default",
    )
    parser.add_argument(
        "--isolation",
        choices=["shared", "executor"],
        default="shared",
        help="shared: the built-in sleep plugin as shipped; executor: a copy that forks a process per subtask",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    plugin_env: dict[str, str] = {}
    plugin = FORKED_SLEEP if args.isolation == "executor" else "sleep"
    job = sleep_job(plugin)
    if args.isolation == "executor":
        workdir.chmod(0o755)  # the sandbox's uid reads the copy
        plugins = sleep_plugin_copy(workdir / "plugins", name=FORKED_SLEEP, isolation="executor")
        plugin_env["EDGEFLEET_PLUGIN_DIRS"] = json.dumps([str(plugins)])

    for setting in args.setting:
        name, sep, value = setting.partition("=")
        if not sep or not name.startswith("EDGEFLEET_"):
            parser.error(f"--setting {setting!r}: expected EDGEFLEET_NAME=VALUE")
        plugin_env[name] = value
    stack = BenchStack(
        workdir,
        **plugin_env,
        EDGEFLEET_CPU_CONCURRENCY=str(args.cpu_concurrency),
        # No start-up node benchmark: seconds of CPU that would land in the idle measurement.
        EDGEFLEET_NODE_BENCH="false",
    )
    cleanups: list[Callable[[], None]] = []
    try:
        redis_url = stack.start_redis()
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        store = JobStore.from_url(redis_url)
        router_pid = start_router(stack, args.router_workers)
        node_cpu = NodeCpu("dispatch")
        cleanups.append(node_cpu.close)
        node_cmd = [sys.executable, "-m", "edgefleet", "worker", "--node-name", "bench", "--classes", "cpu"]
        stack.procs.append(start(node_cpu.command(node_cmd), stack.env, stack.workdir / "node-bench.log"))
        node_cpu.pid = stack.procs[-1].pid
        wait_nodes(store, "bench")
        settings = Settings(redis_url=redis_url)
        # Warm both paths (imports, pools, plugin loading) before measuring.
        bench_raw_celery(settings, client, 50)
        bench_router(stack.url, store, job, 50, args.client_threads, [])
        batch_rate = None
        if args.batch:
            bench_router_batch(stack.url, store, job, 50, args.batch_size)
        meter = CpuMeter({"router": router_pid, "node": node_cpu.pid, "redis": stack.server.pid or 0}, node_cpu)
        cpu: dict[str, float] = {}
        job_ids: list[str] = []
        idle = meter.measure_idle(10.0)
        t0 = meter.read()
        raw_rate = bench_raw_celery(settings, client, args.jobs)
        t1 = meter.read()
        cpu["raw"] = meter.spent(t0, t1, args.jobs, ["bench", "node", "redis"])
        profiler = None

        def start_profiles() -> Profiler | None:
            if args.profile is None:
                return None
            args.profile.mkdir(parents=True, exist_ok=True)
            started = Profiler(args.profile, args.profile_rate)
            started.start("router", router_pid, subprocesses=args.router_workers > 1)
            started.start("node", node_cpu.pid, subprocesses=True)
            return started

        if args.profile_part in ("both", "single"):
            profiler = start_profiles()
        chained = Chained(stack.url)
        chained_before = chained.total()
        t0 = meter.read()
        with BusySlots(store) as busy_single:
            router_rate, latencies = bench_router(stack.url, store, job, args.jobs, args.client_threads, job_ids)
        t1 = meter.read()
        cpu["single"] = meter.spent(t0, t1, args.jobs, ["router", "node", "redis"])
        cpu["single router"] = meter.spent(t0, t1, args.jobs, ["router"])
        cpu["single node"] = meter.spent(t0, t1, args.jobs, ["node"])
        chained_single = chained.total() - chained_before
        depth_single = target_depth(store, settings)
        if profiler is not None and args.profile_part == "single":
            profiler.stop()
            profiler = None
        if args.batch:
            if args.profile_part == "batch":
                profiler = start_profiles()
                time.sleep(1.0)  # py-spy attached before the run starts
                t1 = meter.read()  # the profilers' start-up not counted
            chained_before = chained.total()
            with BusySlots(store) as busy_batch:
                batch_rate = bench_router_batch(stack.url, store, job, args.jobs, args.batch_size)
            t2 = meter.read()
            chained_batch = chained.total() - chained_before
            depth_batch = target_depth(store, settings)
            cpu["batch"] = meter.spent(t1, t2, args.jobs, ["router", "node", "redis"])
            cpu["batch router"] = meter.spent(t1, t2, args.jobs, ["router"])
            cpu["batch node"] = meter.spent(t1, t2, args.jobs, ["node"])
            if "node system" in t2:
                # (Not net of idle: the cgroup's split is counted in 10 ms ticks.)
                cpu["batch node system"] = (t2["node system"] - t1["node system"]) * 1000 / args.jobs
        if profiler is not None:
            profiler.stop()
        t0 = meter.read()
        raw_rate_again = bench_raw_celery(settings, client, args.jobs)
        cpu["raw again"] = meter.spent(t0, meter.read(), args.jobs, ["bench", "node", "redis"])
        in_slot = in_slot_ms(stack.url, job_ids)
    finally:
        stack.stop()
        for cleanup in cleanups:
            cleanup()
    baseline = (raw_rate + raw_rate_again) / 2
    raw_cpu = (cpu["raw"] + cpu["raw again"]) / 2
    print(
        f"jobs per run            {args.jobs}  (router workers: {args.router_workers}; "
        f"plugin {plugin}, isolation {args.isolation})"
    )
    print(f"raw celery send->done   {raw_rate:8.1f} /s  (before) {raw_rate_again:8.1f} /s (after)")
    print(f"router HTTP submit->done{router_rate:8.1f} /s")
    print(f"ratio router/raw        {router_rate / baseline:8.2f}")
    if batch_rate is not None:
        print(f"router batch submit->done{batch_rate:7.1f} /s  ({args.batch_size} jobs per request)")
        print(f"ratio batch/raw         {batch_rate / baseline:8.2f}")
    print(
        f"CPU per job (ms, net)   raw {cpu['raw']:.1f} / {cpu['raw again']:.1f} (producer+node+redis); "
        f"single {cpu['single']:.1f} (router {cpu['single router']:.1f}, node {cpu['single node']:.1f})"
        + (
            f"; batch {cpu['batch']:.1f} (router {cpu['batch router']:.1f}, node {cpu['batch node']:.1f}"
            + (f" of which system {cpu['batch node system']:.1f}" if "batch node system" in cpu else "")
            + ")"
            if args.batch
            else ""
        )
    )
    print(
        f"busy slots (mean)       single {busy_single.mean:.2f}"
        + (f"  batch {busy_batch.mean:.2f}" if args.batch else "")
        + f"  (of {args.cpu_concurrency})"
    )
    print(
        f"taken by chains         single {chained_single / args.jobs:.0%}"
        + (f"  batch {chained_batch / args.jobs:.0%}" if args.batch else "")
        + f"  (the rest by a Celery message each); cpu target depth after: single {depth_single}"
        + (f", batch {depth_batch}" if args.batch else "")
    )
    print(
        f"in slot, claim->finish  p50 {statistics.median(in_slot):.1f}  p90 {percentile(in_slot, 0.9):.1f}  "
        f"max {max(in_slot):.0f} ms; over 100 ms: {sum(1 for v in in_slot if v > 100)} of {len(in_slot)} (single)"
    )
    print(
        "idle CPU (ms/s)         "
        + ", ".join(f"{part} {rate * 1000:.0f}" for part, rate in idle.items())
        + f"  (node counted by {'its cgroup' if meter.node is not None else 'its living process tree'})"
    )
    print(
        f"CPU ratio raw/router    single {raw_cpu / cpu['single']:.2f}"
        + (f"  batch {raw_cpu / cpu['batch']:.2f}" if args.batch else "")
    )
    print(
        f"submit latency          p50 {statistics.median(latencies) * 1000:.1f} ms  "
        f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms  ({args.client_threads} client threads)"
    )


if __name__ == "__main__":
    main()
