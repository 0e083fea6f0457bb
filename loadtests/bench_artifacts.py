"""Artifact transfer between two boxes of the network lab, against a plain HTTP download of the file.

The lab is the tests' (tests/netlab.py): Redis and the router in a "hub" network namespace, two
worker boxes, "alpha" and "beta", each in its own namespace, reaching the hub only over its own
veth link and seeing only its own data folder. `--link-mbit N` limits each link to N Mbit/s each
way (a token bucket on both ends of the veth), so the link, not the machine's shared CPUs, is
what a transfer waits on, as on a home LAN; without it the veths run as fast as the CPUs allow.

Both boxes join as a user would, `edgefleet worker --join <router> ` with a join token. A job
queued before the first box joins measures the time from starting `worker --join` to that box's
first subtask running (and to its "joined" line).

Then, `--runs` times, a two-step job: `blob.make` on alpha writes `--mb` MiB of random bytes,
`blob.digest` on beta hashes the file its `$ref` names, so the file must move: alpha uploads it to
the router (hashed on the way) before its step is marked succeeded, beta fetches it (hashed on
the way, kept in its cache) before its step starts. The legs are what the nodes log
("artifacts stored", "artifact fetched": `seconds` and `ts`):

- upload leg: alpha → router (hash, upload, record);
- fetch leg: router → beta (download, hash, cache, link into the step's inputs);
- the move, upload + fetch: the bytes cross two links one after the other;
- the hand-over: from the start of alpha's upload to the end of beta's fetch, as the job sees it
  (the move plus the dispatch of the second step in between).

The baseline is a plain HTTP download of the same file over the same link (beta's): `curl` in
beta's namespace from a static file server in the hub (`python -m http.server`) and from the
router's `GET /v1/artifacts/{id}`; the fastest counts. Printed: MB/s of each and the ratios.

    python loadtests/bench_artifacts.py --mb 100 --link-mbit 1000

Needs root (network and mount namespaces), like tests/test_lab.py.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import ADMIN_TOKEN, wait_until
from tests.netlab import LAB_PLUGINS, Lab, lab_unavailable, new_lab

MIB = 1024 * 1024
BOXES = ("alpha", "beta")
STATIC_PORT = 8080  # the plain file server in the hub


@dataclass(frozen=True)
class Leg:
    seconds: float
    ended: float  # unix time the node logged it
    cpu: float | None  # the node's CPU seconds for it (its transfer thread); None if not logged

    @property
    def started(self) -> float:
        return self.ended - self.seconds


def logged(lab: Lab, box: str, message: str, after: float) -> Leg:
    """The node's first log line with this message logged after `after` (unix time)."""
    for line in lab.log_tail(f"node-{box}", 10**8).splitlines():
        if f'"msg": "{message}"' not in line:
            continue
        try:
            entry = json.loads(line[line.index("{") :])
        except ValueError:
            continue
        if entry.get("ts", 0) >= after and "seconds" in entry:
            cpu = entry.get("cpu_seconds")
            return Leg(float(entry["seconds"]), float(entry["ts"]), None if cpu is None else float(cpu))
    raise SystemExit(f"no {message!r} line in node-{box}.log:\n{lab.log_tail(f'node-{box}')}")


def stamp_job(lab: Lab) -> dict[str, Any]:
    marker = lab.marks_dir() / f"{uuid.uuid4().hex}.log"
    args = {"seconds": 0, "interval": 0.05, "marker": str(marker)}
    return {"steps": [{"id": "first", "plugin": "stamp", "action": "run", "args": args}]}


def join_time(lab: Lab, box: str, token: str) -> tuple[float, float]:
    """(seconds to the "joined" line, seconds to the first subtask running) after `worker --join`
    starts, with a job already queued that any box may run."""
    job = lab.submit(stamp_job(lab))
    started = time.time()
    lab.join_box(box, token)
    joined_at: float | None = None
    running_at: float | None = None
    deadline = time.monotonic() + 120
    while running_at is None and time.monotonic() < deadline:
        if joined_at is None and "joined http" in lab.log_tail(f"node-{box}", 10**6):
            joined_at = time.time()
        subtask = lab.job(job["id"])["subtasks"][0]
        if subtask.get("started_at"):
            running_at = float(subtask["started_at"])
            assert subtask["node"] == box, subtask
        time.sleep(0.02)
    if running_at is None or joined_at is None:
        raise SystemExit(f"{box} took no work after joining:\n{lab.log_tail(f'node-{box}')}")
    return joined_at - started, running_at - started


@dataclass(frozen=True)
class Move:
    artifact: dict[str, Any]
    upload: Leg
    fetch: Leg
    router_cpu: float  # the router's CPU seconds while the job ran (mostly the two transfers)


def router_cpu(lab: Lab) -> float:
    assert lab.router_proc is not None
    times = psutil.Process(lab.router_proc.pid).cpu_times()
    return float(times.user + times.system)


def move_once(lab: Lab, mb: int) -> Move:
    body = {
        "steps": [
            {"id": "make", "plugin": "blob", "action": "make", "args": {"size_mb": mb}, "node": "alpha"},
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
    submitted, cpu = time.time(), router_cpu(lab)
    status = lab.wait_job(lab.submit(body)["id"], timeout=600)
    cpu = router_cpu(lab) - cpu
    if status["state"] != "succeeded":
        raise SystemExit(f"job {status['state']}: {json.dumps(status, indent=1)}")
    [artifact] = status["artifacts"]
    digest = {st["id"]: st for st in status["subtasks"]}["digest"]
    assert digest["node"] == "beta", digest
    assert digest["output"]["sha256"] == artifact["id"] and digest["output"]["bytes"] == artifact["size"]
    upload = logged(lab, "alpha", "artifacts stored", submitted)
    fetch = logged(lab, "beta", "artifact fetched", submitted)
    return Move(artifact, upload, fetch, cpu)


def curl_seconds(lab: Lab, url: str, target: Path, header_file: Path | None) -> float:
    """Seconds of one `curl` download in beta's namespace, over beta's link, into beta's folder."""
    command = [*lab.enter(lab.boxes["beta"].netns), "curl", "-sS", "--fail", "-o", str(target)]
    if header_file is not None:
        command += ["-H", f"@{header_file}"]  # the token from a file, never on a command line
    done = subprocess.run([*command, "-w", "%{time_total}", url], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"curl {url}: {done.stderr.strip()}")
    target.unlink()
    return float(done.stdout.strip())


def mbps(size: int, seconds: float) -> float:
    return size / 1e6 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100, help="artifact size in MiB")
    parser.add_argument("--link-mbit", type=float, default=0, help="limit each box's link (Mbit/s); 0: no limit")
    parser.add_argument("--runs", type=int, default=3, help="moves (each a new file), and downloads per server")
    args = parser.parse_args()
    # Stopped (timeout, kill): unwind, so the lab's namespaces, links and processes are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    why = lab_unavailable()
    if why:
        raise SystemExit(why)

    lab = new_lab(
        EDGEFLEET_PLUGIN_DIRS=json.dumps([str(LAB_PLUGINS), str(ROOT / "loadtests" / "plugins")]),
        EDGEFLEET_NODE_BENCH="true",  # as a real join does (it runs in the background)
    )
    static: subprocess.Popen[bytes] | None = None
    try:
        lab.build(*BOXES)
        if args.link_mbit:
            for box in BOXES:
                lab.shape(box, args.link_mbit)
        lab.start_hub()
        with lab.http() as http:
            tokens = {}
            for box in BOXES:
                made = http.post("/v1/join-tokens", json={"name": box})
                assert made.status_code == 201, made.text
                tokens[box] = made.json()["token"]
        to_joined, to_first = join_time(lab, "alpha", tokens["alpha"])
        lab.join_box("beta", tokens["beta"])
        lab.wait_boxes_ready(*BOXES)

        moves = [move_once(lab, args.mb) for _ in range(args.runs)]
        size = moves[0].artifact["size"]

        blobs = lab.private / "hub" / "data" / "artifacts"
        serve = ["-m", "http.server", "--bind", lab.hub_address, str(STATIC_PORT), "--directory", str(blobs)]
        static = subprocess.Popen(
            [*lab.enter(lab.hub_ns), sys.executable, *serve],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        headers = lab.private / "hub" / "curl-headers"
        headers.touch(mode=0o600)
        headers.write_text(f"Authorization: Bearer {ADMIN_TOKEN}\n")
        artifact_id = moves[-1].artifact["id"]
        static_url = f"http://{lab.hub_address}:{STATIC_PORT}/{artifact_id[:2]}/{artifact_id}"
        wait_until(lambda: _answers(static_url), 30, interval=0.1, what="the static file server")
        target = lab.private / "beta" / "plain.bin"
        plain_static = [curl_seconds(lab, static_url, target, None) for _ in range(args.runs)]
        router_url = f"{lab.router_url}/v1/artifacts/{artifact_id}"
        plain_router = [curl_seconds(lab, router_url, target, headers) for _ in range(args.runs)]

        upload_s = [m.upload.seconds for m in moves]
        fetch_s = [m.fetch.seconds for m in moves]
        move_s = [m.upload.seconds + m.fetch.seconds for m in moves]
        handover_s = [m.fetch.ended - m.upload.started for m in moves]
        plain_s = min(plain_static + plain_router)
        plain = mbps(size, plain_s)

        link = f"{args.link_mbit:g} Mbit/s each way" if args.link_mbit else "no limit (veth, CPU-bound)"
        print(f"artifact: {size} bytes ({args.mb} MiB), {args.runs} runs; link: {link}")
        print(f"join: 'joined' after {to_joined:.2f} s, first subtask running {to_first:.2f} s after `worker --join`")
        print("                                   best MB/s   median MB/s   vs plain (best)")
        rows = [
            ("upload leg (alpha -> router)", upload_s),
            ("fetch leg (router -> beta)", fetch_s),
            ("move (upload + fetch)", move_s),
            ("hand-over (incl. dispatch)", handover_s),
            ("plain: curl from http.server", plain_static),
            ("plain: curl from the router", plain_router),
        ]
        for label, seconds in rows:
            best = mbps(size, min(seconds))
            median = mbps(size, statistics.median(seconds))
            print(f"{label:34s} {best:9.1f}   {median:11.1f}   {best / plain:6.2f}")
        cpu = {
            "producer box (hash + upload)": [m.upload.cpu for m in moves],
            "router (both legs, whole job)": [m.router_cpu for m in moves],
            "consumer box (fetch + hash)": [m.fetch.cpu for m in moves],
        }
        print(f"CPU seconds per {args.mb} MiB moved (median of {args.runs}):")
        for label, values in cpu.items():
            known = [v for v in values if v is not None]
            print(f"  {label:32s} {statistics.median(known):6.3f}" if known else f"  {label:32s}    n/a")
        print(f"ratio (move / plain download): {mbps(size, min(move_s)) / plain:.2f}")
        print(f"ratio (fetch leg / plain download): {mbps(size, min(fetch_s)) / plain:.2f}")
    finally:
        if static is not None:
            static.terminate()
            static.wait(10)
        lab.close()


def _answers(url: str) -> bool:
    try:
        return httpx.head(url, timeout=1, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
