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
import json
import os
import signal
import statistics
import subprocess
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

from edgefleet.celery_app import PROBE, create_celery  # noqa: E402
from edgefleet.embedded_redis import EmbeddedRedis, free_port  # noqa: E402
from edgefleet.settings import Settings  # noqa: E402

TOKEN = "bench-token"
SLEEP_JOB = {"steps": [{"id": "s", "plugin": "sleep", "action": "sleep", "args": {"seconds": 0}}]}


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def wait_for(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


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


def bench_router(url: str, client: redis.Redis, n: int, threads: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()
    base = client.zcard("ef:jobs:s:succeeded")
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
    wait_for(lambda: client.zcard("ef:jobs:s:succeeded") - base >= n, 600, "router jobs")
    return n / (time.perf_counter() - started), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--client-threads", type=int, default=8)
    parser.add_argument("--cpu-concurrency", type=int, default=2)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    server = EmbeddedRedis(workdir / "redis", port=free_port())
    server.start()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env.update(
        PYTHONPATH=str(ROOT),
        EDGEFLEET_REDIS_URL=server.url,
        EDGEFLEET_TOKENS=json.dumps({TOKEN: {"scopes": ["admin"], "tenant": "bench"}}),
        EDGEFLEET_ROUTER_PORT=str(port),
        EDGEFLEET_DATA_DIR=str(workdir / "data"),
        EDGEFLEET_WORKER_METRICS_PORT="0",
        EDGEFLEET_CPU_CONCURRENCY=str(args.cpu_concurrency),
        EDGEFLEET_LOG_LEVEL="WARNING",
    )
    router = start([sys.executable, "-m", "edgefleet", "router"], env, workdir / "router.log")
    node = start([sys.executable, "-m", "edgefleet", "worker", "--node-name", "bench", "--classes", "cpu"], env, workdir / "node.log")
    url = f"http://127.0.0.1:{port}"
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        wait_for(lambda: _healthy(url), 60, "router")
        wait_for(lambda: client.exists("ef:node:bench"), 60, "worker node")
        settings = Settings(redis_url=server.url)
        # Warm both paths (imports, pools, plugin loading) before measuring.
        bench_raw_celery(settings, client, 50)
        bench_router(url, client, 50, args.client_threads)
        raw_rate = bench_raw_celery(settings, client, args.jobs)
        router_rate, latencies = bench_router(url, client, args.jobs, args.client_threads)
        raw_rate_again = bench_raw_celery(settings, client, args.jobs)
    finally:
        stop(node)
        stop(router)
        server.stop()
    baseline = (raw_rate + raw_rate_again) / 2
    print(f"jobs per run            {args.jobs}")
    print(f"raw celery send->done   {raw_rate:8.1f} /s  (before) {raw_rate_again:8.1f} /s (after)")
    print(f"router HTTP submit->done{router_rate:8.1f} /s")
    print(f"ratio router/raw        {router_rate / baseline:8.2f}")
    print(
        f"submit latency          p50 {statistics.median(latencies) * 1000:.1f} ms  "
        f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms  ({args.client_threads} client threads)"
    )


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
