"""Redis memory before and after N tiny jobs, and after they expire and `edgefleet gc` runs.

A real redis-server, router and cpu+io node (the tests' Cluster helper) with a 5 s retention;
N one-step `text.count` jobs submitted by 8 threads; then, past the retention, `edgefleet gc`.
Prints Redis's `used_memory` and key count at each point.

    python loadtests/bench_retention.py --jobs 2000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgefleet.schemas import JobState
from edgefleet.store import JobStore
from tests.conftest import ADMIN_TOKEN, Cluster, RedisServer, free_port, wait_until

RETENTION_S = 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-retention-"))
    server = RedisServer(port=free_port(), data_dir=work / "redis")
    server.start()
    overrides = {"EDGEFLEET_JOB_RETENTION": str(RETENTION_S), "EDGEFLEET_GC_INTERVAL": "3600"}
    cluster = Cluster(redis=server, workdir=work, env_overrides=overrides)
    client = server.client()
    store = JobStore.from_url(server.url)

    def memory() -> tuple[int, int]:
        return int(client.info("memory")["used_memory"]), int(client.dbsize())

    try:
        cluster.start_router()
        cluster.start_node("n1", classes="cpu,io")
        cluster.wait_nodes_ready("n1")
        time.sleep(2)  # the node's first heartbeats and metrics settle
        before = memory()
        body = {"steps": [{"id": "a", "plugin": "text", "action": "count", "args": {"text": "a b a"}}]}

        def submit(_: int) -> None:
            cluster.submit(body)

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(submit, range(args.jobs)))
        wait_until(lambda: store.job_counts()[JobState.running] == 0, 1800, interval=1, what="every job finished")
        run_s = time.monotonic() - started
        after_jobs = memory()
        time.sleep(RETENTION_S + 1)
        gc = subprocess.run(
            [sys.executable, "-m", "edgefleet", "gc", "--url", cluster.url, "--token", ADMIN_TOKEN],
            env=cluster.env(),
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        after_gc = memory()
        print(json.dumps({"jobs": args.jobs, "run_s": round(run_s, 1), "gc": gc.stdout.strip() or gc.stderr.strip()}))
        for label, (used, keys) in (("before", before), ("after the jobs", after_jobs), ("after gc", after_gc)):
            print(f"{label:<16} used_memory {used:>12,} B   keys {keys:>7,}")
    finally:
        cluster.stop()
        server.stop()


if __name__ == "__main__":
    main()
