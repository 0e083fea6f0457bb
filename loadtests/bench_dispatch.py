"""Dispatch overhead: one-step `sleep 0` jobs through the router's HTTP API against raw Celery.

Both run in one script on the same redis-server and the same worker node, so the
ratio is meaningful on a noisy machine. Raw Celery sends `edgefleet.probe`
tasks (one Redis INCR each) to the same `cpu` queue; the router path submits
over HTTP, plans, stores, releases, claims, runs the sleep plugin and records
the result. Prints both rates, their ratio and the submit latency percentiles.

    python loadtests/bench_dispatch.py --jobs 1000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgefleet.celery_app import PROBE, create_celery
from edgefleet.schemas import JobState
from edgefleet.settings import Settings
from edgefleet.store import JobStore
from loadtests.harness import TOKEN, BenchStack, wait_for, wait_nodes

SLEEP_JOB = {"steps": [{"id": "s", "plugin": "sleep", "action": "sleep", "args": {"seconds": 0}}]}


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


def bench_router(url: str, store: JobStore, n: int, threads: int) -> tuple[float, list[float]]:
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
        response = local.http.post("/v1/jobs", json=SLEEP_JOB)
        elapsed = time.perf_counter() - t0
        response.raise_for_status()
        with lock:
            latencies.append(elapsed)

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(submit, range(n)))
    wait_for(lambda: succeeded() - base >= n, 600, "router jobs")
    return n / (time.perf_counter() - started), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--client-threads", type=int, default=8)
    parser.add_argument("--cpu-concurrency", type=int, default=2)
    args = parser.parse_args()

    stack = BenchStack(
        Path(tempfile.mkdtemp(prefix="edgefleet-bench-")), EDGEFLEET_CPU_CONCURRENCY=str(args.cpu_concurrency)
    )
    try:
        redis_url = stack.start_redis()
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        store = JobStore.from_url(redis_url)
        stack.start_router()
        stack.start_node("bench")
        wait_nodes(store, "bench")
        settings = Settings(redis_url=redis_url)
        # Warm both paths (imports, pools, plugin loading) before measuring.
        bench_raw_celery(settings, client, 50)
        bench_router(stack.url, store, 50, args.client_threads)
        raw_rate = bench_raw_celery(settings, client, args.jobs)
        router_rate, latencies = bench_router(stack.url, store, args.jobs, args.client_threads)
        raw_rate_again = bench_raw_celery(settings, client, args.jobs)
    finally:
        stack.stop()
    baseline = (raw_rate + raw_rate_again) / 2
    print(f"jobs per run            {args.jobs}")
    print(f"raw celery send->done   {raw_rate:8.1f} /s  (before) {raw_rate_again:8.1f} /s (after)")
    print(f"router HTTP submit->done{router_rate:8.1f} /s")
    print(f"ratio router/raw        {router_rate / baseline:8.2f}")
    print(
        f"submit latency          p50 {statistics.median(latencies) * 1000:.1f} ms  "
        f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms  ({args.client_threads} client threads)"
    )


if __name__ == "__main__":
    main()
