"""Artifact transfer: a file moving node -> router -> node, against a plain HTTP download of it.

One redis-server, one router (the default `router` backend: its data dir) and two worker nodes,
"alpha" and "beta", each with its own data and workspace folders. A two-step job: `blob.make`
on alpha writes `--mb` MiB of random bytes, `blob.digest` on beta hashes the file its `$ref`
names, so the file must move: alpha hashes and uploads it before its step is marked
succeeded, beta fetches, hashes and caches it before its step starts. The move's time is what
the nodes log for those two parts ("artifacts stored" and "artifact fetched", `seconds`);
the baseline is a plain streamed HTTP GET of the same blob from the router into a file, on the
same machine. Printed: MB/s of each and their ratio (move ÷ plain download).

    python loadtests/bench_artifacts.py --mb 100
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgefleet.store import JobStore
from loadtests.harness import TOKEN, BenchStack, wait_for, wait_nodes

MIB = 1024 * 1024
NODES = ("alpha", "beta")


def logged_seconds(log: Path, message: str) -> float:
    """`seconds` of the last JSON log line with this message."""
    found = None
    for line in log.read_text(errors="replace").splitlines():
        if message in line:
            try:
                found = json.loads(line[line.index("{") :])
            except ValueError:
                continue
    if not found or "seconds" not in found:
        raise SystemExit(f"no {message!r} line with seconds in {log}")
    return float(found["seconds"])


def plain_download(url: str, artifact_id: str, target: Path) -> float:
    """Seconds of one streamed GET of the blob into a file (no hashing: the baseline)."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    started = time.perf_counter()
    with httpx.stream("GET", f"{url}/v1/artifacts/{artifact_id}", headers=headers, timeout=300) as response:
        response.raise_for_status()
        with open(target, "wb") as out:
            for chunk in response.iter_bytes(MIB):
                out.write(chunk)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100, help="artifact size in MiB")
    parser.add_argument("--downloads", type=int, default=3, help="plain downloads; the fastest counts")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-artifacts-"))
    stack = BenchStack(
        workdir,
        EDGEFLEET_PLUGIN_DIRS=json.dumps([str(ROOT / "loadtests" / "plugins")]),
        EDGEFLEET_CPU_CONCURRENCY="1",
        EDGEFLEET_EXPRESS_SLOTS="0",
    )
    try:
        stack.start_redis()
        stack.start_router()
        stack.env["EDGEFLEET_ROUTER_URL"] = stack.url
        for name in NODES:
            stack.start_node(
                name,
                EDGEFLEET_LOG_LEVEL="INFO",  # the transfer times are in the nodes' INFO lines
                EDGEFLEET_DATA_DIR=str(workdir / f"box-{name}" / "data"),
                EDGEFLEET_WORKSPACE_DIR=str(workdir / f"box-{name}" / "workspaces"),
            )
        store = JobStore.from_url(stack.env["EDGEFLEET_REDIS_URL"])
        wait_nodes(store, *NODES)
        body = {
            "steps": [
                {"id": "make", "plugin": "blob", "action": "make", "args": {"size_mb": args.mb}, "node": "alpha"},
                {
                    "id": "digest",
                    "plugin": "blob",
                    "action": "digest",
                    "args": {"path": {"$ref": "steps.make.output.path"}},
                    "node": "beta",
                    "timeout": 600,
                },
            ]
        }
        with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
            job = http.post("/v1/jobs", json=body).raise_for_status().json()
            status: dict = {}

            def done() -> bool:
                nonlocal status
                status = http.get(f"/v1/jobs/{job['id']}").json()
                return status["state"] != "running"

            wait_for(done, 600, "the job")
        if status["state"] != "succeeded":
            raise SystemExit(f"job {status['state']}: {json.dumps(status, indent=1)}")
        [artifact] = status["artifacts"]
        digest = {st["id"]: st for st in status["subtasks"]}["digest"]["output"]
        assert digest["sha256"] == artifact["id"] and digest["bytes"] == artifact["size"], (digest, artifact)

        size_mb = artifact["size"] / 1e6
        upload_s = logged_seconds(workdir / "node-alpha.log", '"artifacts stored"')
        fetch_s = logged_seconds(workdir / "node-beta.log", '"artifact fetched"')
        plain_s = min(
            plain_download(stack.url, artifact["id"], workdir / f"plain-{i}.bin") for i in range(args.downloads)
        )
        move = size_mb / (upload_s + fetch_s)
        plain = size_mb / plain_s
        print(f"artifact: {artifact['size']} bytes ({args.mb} MiB), sha256 checked on arrival")
        print(f"node -> router (hash + upload):        {upload_s:6.2f} s  {size_mb / upload_s:7.1f} MB/s")
        print(f"router -> node (fetch + hash + cache): {fetch_s:6.2f} s  {size_mb / fetch_s:7.1f} MB/s")
        print(f"node -> router -> node:                {upload_s + fetch_s:6.2f} s  {move:7.1f} MB/s")
        print(f"plain HTTP download from the router:   {plain_s:6.2f} s  {plain:7.1f} MB/s")
        print(f"ratio (move / plain download): {move / plain:.2f}")
        # The move is two transfers (up, then down) on one machine's CPUs: the fetch leg alone
        # is the like-for-like figure for one hop.
        print(f"ratio (fetch leg / plain download): {size_mb / fetch_s / plain:.2f}")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
