"""Submit latency at a fixed arrival rate (open loop): `POST /v1/jobs` of one-step `sleep 0` jobs.

Request i is due at start + i / rate whatever happened to the ones before (an open-loop
client, as real traffic arrives), and its latency is measured from that due time, not from
when it was actually sent: a router that falls behind shows it as queueing in the figures
instead of slowing the client down (what closed-loop threads hide). Prints p50/p90/p99/max,
the answered rate and how late the client itself sent (its own lag, to tell the two apart).

By default no worker node runs, so the figure is the submit path alone (plan, create,
release into the broker; the class queue fills to its target depth, the rest waits in the
backlog); `--with-node` adds one node that runs the jobs on the same cores.

    python loadtests/bench_submit_latency.py --rate 100 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgefleet.store import JobStore
from loadtests.harness import TOKEN, BenchStack, healthy, start, wait_for, wait_nodes

SLEEP_JOB = {"steps": [{"id": "s", "plugin": "sleep", "action": "sleep", "args": {"seconds": 0}}]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def open_loop(url: str, rate: float, seconds: float) -> tuple[list[float], list[float], int]:
    """(latency from due time, send lag) of each answered request, and the number of errors."""
    latencies: list[float] = []
    lags: list[float] = []
    errors = 0
    total = int(rate * seconds)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as http:

        async def one(due: float) -> None:
            nonlocal errors
            lags.append(time.perf_counter() - due)
            try:
                response = await http.post("/v1/jobs", json=SLEEP_JOB)
            except httpx.HTTPError:  # a connection the router dropped or never answered: counted, not fatal
                errors += 1
                return
            if response.status_code == 201:
                latencies.append(time.perf_counter() - due)
            else:
                errors += 1

        start_at = time.perf_counter() + 0.1
        tasks = []
        for i in range(total):
            due = start_at + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(due)))
        await asyncio.gather(*tasks)
    return latencies, lags, errors


def _tree_cpu(root: psutil.Process) -> float:
    """CPU seconds of a process and its children (the workers of `router --workers N`)."""
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=100.0, help="jobs per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds at the same rate before measuring")
    parser.add_argument("--router-workers", type=int, default=1, help="edgefleet router --workers N")
    parser.add_argument("--with-node", action="store_true", help="run one worker node (cpu) that runs the jobs")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy profile (raw) of the router into FILE")
    args = parser.parse_args()

    stack = BenchStack(Path(tempfile.mkdtemp(prefix="edgefleet-bench-")))
    try:
        redis_url = stack.start_redis()
        store = JobStore.from_url(redis_url)
        cmd = [sys.executable, "-m", "edgefleet", "router"]
        if args.router_workers > 1:
            cmd += ["--workers", str(args.router_workers)]
        stack.procs.append(start(cmd, stack.env, stack.workdir / "router.log"))
        wait_for(lambda: healthy(stack.url), 60, "router")
        if args.with_node:
            stack.start_node("bench")
            wait_nodes(store, "bench")
        asyncio.run(open_loop(stack.url, args.rate, args.warmup))
        router = psutil.Process(stack.procs[0].pid)
        spy = None
        if args.profile is not None:
            py_spy = str(Path(sys.executable).with_name("py-spy"))
            cmd = [py_spy, "record", "--format", "raw", "--gil", "--subprocesses", "--pid", str(router.pid)]
            spy = subprocess.Popen([*cmd, "--output", str(args.profile)], stdout=subprocess.DEVNULL)
        cpu_before = _tree_cpu(router)
        latencies, lags, errors = asyncio.run(open_loop(stack.url, args.rate, args.seconds))
        router_cpu = _tree_cpu(router) - cpu_before
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            spy.wait(60)
    finally:
        stack.stop()
    answered = len(latencies)
    print(
        f"offered rate        {args.rate:.0f} jobs/s for {args.seconds:g} s (open loop), router workers "
        f"{args.router_workers}, {'one node running the jobs' if args.with_node else 'no node'}"
    )
    print(f"answered            {answered} (201), errors {errors}")
    ms = [x * 1000 for x in latencies]
    print(
        f"submit latency      p50 {statistics.median(ms):.1f} ms  p90 {percentile(ms, 0.9):.1f} ms  "
        f"p99 {percentile(ms, 0.99):.1f} ms  max {max(ms):.1f} ms  (from each request's due time)"
    )
    print(f"router CPU per job  {router_cpu * 1000 / max(1, answered):.2f} ms  (its background loops included)")
    lag_ms = [x * 1000 for x in lags]
    print(f"client send lag     p50 {statistics.median(lag_ms):.1f} ms  p99 {percentile(lag_ms, 0.99):.1f} ms")


if __name__ == "__main__":
    main()
