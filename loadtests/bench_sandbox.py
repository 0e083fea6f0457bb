"""Sandbox start: a subtask's claim -> result time with warm launchers against cold starts.

One script, one redis-server, one router and two worker nodes that differ only in
`EDGEFLEET_SANDBOX_WARM`: node "warm" (1: the next launcher for a plugin starts while the
current subtask runs) and node "cold" (0: every attempt starts its launcher). One-step
`sleep` jobs, pinned to the nodes in turn and run one at a time, so that neither node
competes with the other for the CPU. The subtask's `started_at` (claim) and `finished_at`
(result recorded) come from the job store; the plugin itself sleeps `--seconds`.

    python loadtests/bench_sandbox.py --jobs 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgefleet.store import JobStore
from loadtests.harness import TOKEN, BenchStack, wait_for, wait_nodes

NODES = {"warm": "1", "cold": "0"}


def run_one(http: httpx.Client, node: str, seconds: float) -> float:
    """Claim -> result of one subtask on `node`, in seconds."""
    body = {"steps": [{"id": "s", "plugin": "sleep", "action": "sleep", "args": {"seconds": seconds}, "node": node}]}
    job = http.post("/v1/jobs", json=body).raise_for_status().json()
    status: dict = {}

    def done() -> bool:
        nonlocal status
        status = http.get(f"/v1/jobs/{job['id']}").json()
        return status["state"] in ("succeeded", "failed", "cancelled")

    wait_for(done, 60, f"job on {node}")
    if status["state"] != "succeeded":
        raise SystemExit(f"job on {node} ended {status['state']}: {status}")
    subtask = status["subtasks"][0]
    return subtask["finished_at"] - subtask["started_at"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40, help="jobs per node")
    parser.add_argument("--seconds", type=float, default=0.2, help="the sleep plugin's run time")
    args = parser.parse_args()

    stack = BenchStack(
        Path(tempfile.mkdtemp(prefix="edgefleet-bench-sandbox-")),
        EDGEFLEET_CPU_CONCURRENCY="1",
        EDGEFLEET_EXPRESS_SLOTS="0",
    )
    times: dict[str, list[float]] = {name: [] for name in NODES}
    try:
        store = JobStore.from_url(stack.start_redis())
        stack.start_router()
        for name, warm in NODES.items():
            stack.start_node(name, EDGEFLEET_SANDBOX_WARM=warm)
        wait_nodes(store, *NODES)
        with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as http:
            for name in NODES:  # the first runs import and start everything once
                for _ in range(3):
                    run_one(http, name, args.seconds)
            for _ in range(args.jobs):
                for name in NODES:
                    times[name].append(run_one(http, name, args.seconds))
    finally:
        stack.stop()
    warm, cold = (statistics.median(times[name]) for name in NODES)
    print(f"jobs per node                 {args.jobs} (sleep {args.seconds:g} s, one at a time)")
    print(f"claim -> result p50, warm     {warm * 1000:7.1f} ms  (overhead {(warm - args.seconds) * 1000:.1f} ms)")
    print(f"claim -> result p50, cold     {cold * 1000:7.1f} ms  (overhead {(cold - args.seconds) * 1000:.1f} ms)")
    print(f"ratio warm / cold             {warm / cold:7.2f}")


if __name__ == "__main__":
    main()
