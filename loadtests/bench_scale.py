"""Redis memory per queued job, and whether create and release slow down as the backlog grows.

One redis-server (the one `edgefleet up` embeds, or --redis-server; no AOF or RDB, so that
neither disk nor a rewrite fork is measured) and the job store, no router or worker: the
backlog is filled with one-step `text.count` jobs through `JobStore.create_job`, as the
router's submit path stores them (a planned step, the request as the router serialises it,
a sha256 request hash). Two backlogs in the same server: --jobs queued under the default
key prefix and 1,000 under a prefix of their own. Redis `used_memory` per job, from the
growth while each was filled; then --rounds rounds, alternating which size goes first, each
creating --batch jobs and releasing as many (the RELEASE script, 100 a call, target depth
out of the way) on both sizes, so that the shared machine's changing load falls on both
alike. Medians per job, as the caller sees it (round trips included) and as Redis spends it
(INFO commandstats, per call of the script). Prints both sizes and their ratios.

    python loadtests/bench_scale.py --jobs 100000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgefleet.cli.embedded_redis import free_port, redis_server_executable
from edgefleet.scheduling.state import SchedulerState
from edgefleet.schemas import JobRequest, Plan, PlannedSubtask, PriorityClass, ResourceClass
from edgefleet.store import JobStore
from loadtests.harness import wait_for

SMALL = 1000
RELEASE_CHUNK = 100
NO_TARGET = 10**9  # a target depth RELEASE never reaches: it releases all it is asked for
STEP = {"id": "a", "plugin": "text", "action": "count", "args": {"text": "a b a"}}


@dataclass(frozen=True)
class Costs:
    """Median per job over the rounds: seconds at the caller, microseconds inside Redis."""

    create_s: float
    create_redis_us: float
    release_s: float
    release_redis_us: float


class Backlog:
    """Queued one-step jobs in one store, created and released the way the router does."""

    def __init__(self, store: JobStore, client: redis.Redis) -> None:
        self.store = store
        self.client = client
        self.scheduler = SchedulerState.of(store)
        request = JobRequest.model_validate({"steps": [STEP]})
        self.request_json = json.dumps(request.model_dump(mode="json"))
        self.request_hash = hashlib.sha256(self.request_json.encode()).hexdigest()
        self.plan = Plan(
            subtasks=[
                PlannedSubtask(
                    id=STEP["id"],
                    plugin="text",
                    action="count",
                    args={"text": "a b a"},
                    needs=[],
                    dependents=[],
                    resource_class=ResourceClass.cpu,
                    timeout=300,
                    retries=0,
                    retry_backoff=1.0,
                )
            ]
        )
        self.created = 0

    def create(self, n: int) -> None:
        for _ in range(n):
            self.store.create_job(
                job_id=uuid.uuid4().hex,
                tenant="bench",
                priority=PriorityClass.normal,
                name=None,
                callback_url=None,
                plan=self.plan,
                request_json=self.request_json,
                request_hash=self.request_hash,
                idempotency_key=None,
            )
        self.created += n

    def release(self, n: int) -> None:
        left = n
        while left > 0:
            released = self.scheduler.release(ResourceClass.cpu, min(RELEASE_CHUNK, left), NO_TARGET)
            if not released:
                raise RuntimeError(f"the backlog ran dry with {left} still to release")
            left -= len(released)

    def queued(self) -> int:
        return self.scheduler.backlog_size(ResourceClass.cpu)

    def used_memory(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def timed(self, action: Callable[[int], None], n: int) -> tuple[float, float]:
        """(seconds per job at the caller, Redis microseconds per script call) of `action(n)`."""
        self.client.config_resetstat()
        started = time.perf_counter()
        action(n)
        elapsed = time.perf_counter() - started
        stats = self.client.info("commandstats")
        script = stats.get("cmdstat_evalsha") or stats.get("cmdstat_eval") or {"usec_per_call": 0.0}
        return elapsed / n, float(script["usec_per_call"])

    def round(self, batch: int) -> Costs:
        """Create `batch`, then release `batch`: the backlog ends where it began."""
        create_s, create_us = self.timed(self.create, batch)
        release_s, release_us = self.timed(self.release, batch)
        return Costs(create_s, create_us, release_s, release_us / RELEASE_CHUNK)  # each call releases a chunk


def median_costs(rounds: list[Costs]) -> Costs:
    return Costs(
        statistics.median(c.create_s for c in rounds),
        statistics.median(c.create_redis_us for c in rounds),
        statistics.median(c.release_s for c in rounds),
        statistics.median(c.release_redis_us for c in rounds),
    )


def start_redis(executable: str, data_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    options = ["--appendonly", "no", "--save", "", "--logfile", ""]  # memory and CPU only: no disk
    command = [executable, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), *options]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000, help="queued jobs at the large size")
    parser.add_argument("--batch", type=int, default=500, help="jobs created (and released) per timed round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--redis-server", default=None, help="redis-server binary (default: the embedded one)")
    args = parser.parse_args()
    if args.jobs <= SMALL:
        parser.error(f"--jobs must be more than {SMALL}")
    executable = args.redis_server or redis_server_executable()
    version = subprocess.run([executable, "--version"], capture_output=True, text=True).stdout.split()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-scale-"))
    proc, port = start_redis(executable, work)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, decode_responses=True)
    # The large backlog under the default prefix, the small one beside it under its own, in the
    # same server: their timed rounds alternate, so that a change in the shared machine's load
    # falls on both sizes alike.
    stores = {args.jobs: JobStore.from_url(url), SMALL: JobStore.from_url(url, prefix="small")}
    try:
        wait_for(lambda: _pings(client), 20, "redis-server")
        backlogs = {size: Backlog(store, client) for size, store in stores.items()}
        for backlog in backlogs.values():
            # One job through both scripts first: the baseline has them loaded, and the store's own keys.
            backlog.create(1)
            backlog.release(1)
            backlog.created = 0
        tag = " ".join(v for v in version if v.startswith(("v=", "malloc=")))
        print(f"redis-server {tag}; empty store {backlogs[SMALL].used_memory():,} B")

        per_job: dict[int, float] = {}
        for size, backlog in backlogs.items():
            before, started = backlog.used_memory(), time.monotonic()
            backlog.create(size)
            per_job[size] = (backlog.used_memory() - before) / size
            print(
                f"filled to {backlog.queued():,} queued in {time.monotonic() - started:.0f} s: "
                f"{per_job[size]:,.0f} B of Redis per job"
            )

        samples: dict[int, list[Costs]] = {size: [] for size in backlogs}
        for r in range(args.rounds):
            for size in (SMALL, args.jobs) if r % 2 == 0 else (args.jobs, SMALL):
                samples[size].append(backlogs[size].round(args.batch))
        rows = {size: median_costs(samples[size]) for size in (SMALL, args.jobs)}

        print(f"\n{'queued':>9} {'B/job':>7} {'create ms':>10} {'create us in Redis':>19} "
              f"{'release ms':>11} {'release us in Redis':>20}")  # fmt: skip
        for size, c in rows.items():
            print(
                f"{size:>9,} {per_job[size]:>7,.0f} {c.create_s * 1000:>10.3f} {c.create_redis_us:>19.1f} "
                f"{c.release_s * 1000:>11.3f} {c.release_redis_us:>20.1f}"
            )
        small, large = rows[SMALL], rows[args.jobs]
        print(
            json.dumps(
                {
                    "bytes_per_job": round(per_job[args.jobs]),
                    "create_ratio": round(large.create_s / small.create_s, 2),
                    "create_redis_ratio": round(large.create_redis_us / small.create_redis_us, 2),
                    "release_ratio": round(large.release_s / small.release_s, 2),
                    "release_redis_ratio": round(large.release_redis_us / small.release_redis_us, 2),
                }
            )
        )
    finally:
        for store in stores.values():
            store.close()
        client.close()
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


if __name__ == "__main__":
    main()
