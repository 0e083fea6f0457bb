"""Sandbox start: a subtask's claim -> result time and CPU with a reused executor, a warm launcher, a cold start.

One script, one redis-server, one router and three worker nodes that differ only in their
sandbox settings: node "reuse" (the default: an executor per plugin and tenant serves
subtask after subtask, forking a process per subtask after the plugin's import), node
"warm" (`EDGEFLEET_SANDBOX_EXECUTOR_SUBTASKS=0`, `EDGEFLEET_SANDBOX_WARM=1`: a fresh launcher
per subtask, the next one started while the current one runs) and node "cold" (both 0:
every attempt starts its launcher). Jobs pinned to the nodes in turn and run one at a
time, so that no node competes with another for the CPU:

- one-step `sleep` jobs (the plugin sleeps `--seconds`): claim -> result from the job store's
  `started_at` / `finished_at`, and the CPU the node used per job: everything it started
  (worker, Celery children, sandboxes) runs in a cpuacct cgroup of its own where the box
  allows one (root, cgroup v1 or v2); else the sum over its living process tree, which misses
  a launcher that bwrap leaves to another reaper;
- two-step `text` jobs (transform, saving a file; then count that file): the second step has
  an input file, which an executor shows through its mirror (hard links) and the other
  nodes bind in a launcher started for that step.

Then, in this process, what the mirror costs per subtask: linking one file, and a folder of
100 files, into an executor's mirror and emptying it again (a file the plugin's own uid
could change is copied instead: then the cost grows with its size).

    python loadtests/bench_sandbox.py --jobs 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgefleet.store import JobStore
from edgefleet.workers.sandbox_executors import empty_mirror, show
from loadtests.harness import TOKEN, BenchStack, NodeCpu, start, wait_for, wait_nodes

NODES = {
    "reuse": {},
    "warm": {"EDGEFLEET_SANDBOX_EXECUTOR_SUBTASKS": "0", "EDGEFLEET_SANDBOX_WARM": "1"},
    "cold": {"EDGEFLEET_SANDBOX_EXECUTOR_SUBTASKS": "0", "EDGEFLEET_SANDBOX_WARM": "0"},
}


def run_job(http: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    job = http.post("/v1/jobs", json=body).raise_for_status().json()
    status: dict[str, Any] = {}

    def done() -> bool:
        nonlocal status
        status = http.get(f"/v1/jobs/{job['id']}").json()
        return status["state"] in ("succeeded", "failed", "cancelled")

    wait_for(done, 60, "job")
    if status["state"] != "succeeded":
        raise SystemExit(f"job ended {status['state']}: {status}")
    return status


def sleep_job(http: httpx.Client, node: str, seconds: float) -> float:
    """Claim -> result of one subtask on `node`, in seconds."""
    body: dict[str, Any] = {
        "steps": [{"id": "s", "plugin": "sleep", "action": "sleep", "args": {"seconds": seconds}, "node": node}]
    }
    subtask = run_job(http, body)["subtasks"][0]
    return float(subtask["finished_at"] - subtask["started_at"])


def input_job(http: httpx.Client, node: str) -> float:
    """Claim -> result of a step that reads the file its job's first step wrote."""
    body: dict[str, Any] = {
        "steps": [
            {
                "id": "t",
                "plugin": "text",
                "action": "transform",
                "args": {"text": "some words to count " * 20, "op": "upper", "save_as": "out.txt"},
                "node": node,
            },
            {
                "id": "c",
                "plugin": "text",
                "action": "count",
                "needs": ["t"],
                "args": {"path": {"$ref": "steps.t.output.path"}},
                "node": node,
            },
        ]
    }
    count = next(st for st in run_job(http, body)["subtasks"] if st["id"] == "c")
    return float(count["finished_at"] - count["started_at"])


def mirror_cost(files: int, rounds: int = 50) -> float:
    """Milliseconds to show one file, or a folder of `files` files, to an executor's subtask (hard
    links into its mirror, as for files another plugin wrote) and to empty the mirror again."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-mirror-") as folder:
        root = Path(folder)
        source = root / "job" / "step"
        source.mkdir(parents=True)
        for i in range(files):
            (source / f"f{i}.txt").write_text("x" * 1000)
        mirror = root / "view"
        path = source / "f0.txt" if files == 1 else source
        started = time.perf_counter()
        for _ in range(rounds):
            show(mirror / path.relative_to(root), path, uid=65534)  # another uid's files: linked
            empty_mirror(mirror)
        return (time.perf_counter() - started) / rounds * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=30, help="jobs of each kind per node")
    parser.add_argument("--seconds", type=float, default=0.2, help="the sleep plugin's run time")
    args = parser.parse_args()

    stack = BenchStack(
        Path(tempfile.mkdtemp(prefix="edgefleet-bench-sandbox-")),
        EDGEFLEET_CPU_CONCURRENCY="1",
        EDGEFLEET_EXPRESS_SLOTS="0",
    )
    times: dict[str, list[float]] = {name: [] for name in NODES}
    inputs: dict[str, list[float]] = {name: [] for name in NODES}
    cpu: dict[str, float] = dict.fromkeys(NODES, 0.0)
    meters = {name: NodeCpu(name) for name in NODES}
    try:
        store = JobStore.from_url(stack.start_redis())
        stack.start_router()
        for name, overrides in NODES.items():
            cmd = [sys.executable, "-m", "edgefleet", "worker", "--node-name", name, "--classes", "cpu"]
            node = start(meters[name].command(cmd), {**stack.env, **overrides}, stack.workdir / f"node-{name}.log")
            stack.procs.append(node)
            meters[name].pid = node.pid
        wait_nodes(store, *NODES)
        with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as http:
            for name in NODES:  # the first runs import and start everything once
                for _ in range(3):
                    sleep_job(http, name, args.seconds)
                    input_job(http, name)
            for _ in range(args.jobs):
                for name in NODES:
                    before = meters[name].seconds()
                    times[name].append(sleep_job(http, name, args.seconds))
                    cpu[name] += meters[name].seconds() - before
            for _ in range(args.jobs):
                for name in NODES:
                    inputs[name].append(input_job(http, name))
    finally:
        stack.stop()
        for meter in meters.values():
            meter.close()
    accounted = "cgroup" if all(m.folder for m in meters.values()) else "living process tree"
    p50 = {name: statistics.median(times[name]) for name in NODES}
    p50_inputs = {name: statistics.median(inputs[name]) for name in NODES}
    print(f"jobs per node and kind        {args.jobs} (sleep {args.seconds:g} s, one at a time; CPU: {accounted})")
    for name in NODES:
        print(
            f"claim -> result p50, {name:<6}   {p50[name] * 1000:7.1f} ms  "
            f"(overhead {(p50[name] - args.seconds) * 1000:.1f} ms; node CPU per job "
            f"{cpu[name] / args.jobs * 1000:.1f} ms; step with an input file {p50_inputs[name] * 1000:.1f} ms)"
        )
    print(f"ratio reuse / warm            {p50['reuse'] / p50['warm']:7.2f}")
    print(f"ratio reuse / cold            {p50['reuse'] / p50['cold']:7.2f}")
    print(f"ratio warm / cold             {p50['warm'] / p50['cold']:7.2f}")
    print(f"CPU per job reuse / cold      {cpu['reuse'] / cpu['cold']:7.2f}")
    print(f"mirror: 1 file / 100 files    {mirror_cost(1):.2f} / {mirror_cost(100):.2f} ms per subtask")


if __name__ == "__main__":
    main()
