"""Retention: finished jobs, their subtasks, events, idempotency keys and workspaces expire;
running jobs never do. `edgefleet gc` deletes finished jobs on demand.

Real parts: redis-server, a router and (for workspaces) a worker node, each a process;
the CLI in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from edgefleet.store import JobStore
from tests.conftest import ADMIN_TOKEN, ROOT, Cluster, wait_until

pytestmark = pytest.mark.cluster

RETENTION = 3  # seconds: short, so that the test sees jobs expire
COUNT = {"steps": [{"id": "a", "plugin": "text", "action": "count", "args": {"text": "a b a"}}]}
LONG = {"steps": [{"id": "nap", "plugin": "sleep", "action": "sleep", "args": {"seconds": 120}}]}


def _job_keys(cluster: Cluster, job_id: str) -> list[str]:
    return sorted(k for k in cluster.redis.client().keys("*") if job_id in k)


def _indexed(cluster: Cluster, job_id: str) -> list[str]:
    """The sorted-set indexes (lists by tenant/state, the finished index) that still name the job."""
    client = cluster.redis.client()
    return sorted(
        k for k in client.keys("ef:jobs*") + client.keys("ef:finished") if client.zscore(k, job_id) is not None
    )


def _gone(http: httpx.Client, job_id: str) -> bool:
    return http.get(f"/v1/jobs/{job_id}").status_code == 404


def test_finished_jobs_expire_running_ones_stay(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = cluster_factory(EDGEFLEET_JOB_RETENTION=str(RETENTION), EDGEFLEET_GC_INTERVAL="0.5")
    cluster.start_router()
    cluster.start_node("n1", classes="cpu,io")
    cluster.wait_nodes_ready("n1")
    workspaces = cluster.workdir / "data" / "workspaces"

    with cluster.client() as http:
        long_job = cluster.submit(LONG)
        done = cluster.wait_job(cluster.submit(COUNT)["id"])
        keyed = cluster.wait_job(cluster.submit(COUNT, **{"Idempotency-Key": "nightly-1"})["id"])
        assert done["state"] == keyed["state"] == "succeeded"
        # The answer says how long a finished job is kept; a running one has no end yet.
        assert done["expires_at"] == done["finished_at"] + RETENTION
        listed = {job["id"]: job for job in http.get("/v1/jobs").json()["jobs"]}
        assert listed[long_job["id"]]["expires_at"] is None and long_job["expires_at"] is None
        assert (workspaces / done["id"]).is_dir()
        assert _job_keys(cluster, done["id"]) and _indexed(cluster, done["id"])

        wait_until(
            lambda: _gone(http, done["id"]) and _gone(http, keyed["id"]),
            60,
            interval=0.2,
            what="finished jobs to expire",
        )
        for job_id in (done["id"], keyed["id"]):
            assert _job_keys(cluster, job_id) == [], "job, subtask and event keys are deleted"
            assert _indexed(cluster, job_id) == [], "no list index names it any more"
        assert cluster.redis.client().get("ef:idem:ops:nightly-1") is None
        listed_ids = [job["id"] for job in http.get("/v1/jobs").json()["jobs"]]
        assert listed_ids == [long_job["id"]]
        # The idempotency key went with its job: the same key now makes a new job.
        again = http.post("/v1/jobs", json=COUNT, headers={"Idempotency-Key": "nightly-1"})
        assert again.status_code == 201, again.text
        assert again.json()["id"] != keyed["id"]

        # The node removes the expired jobs' workspaces once they are older than the retention.
        wait_until(lambda: not (workspaces / done["id"]).exists(), 60, interval=0.2, what="workspace removed")

        # The running job outlived the retention and is untouched, workspace included.
        running = http.get(f"/v1/jobs/{long_job['id']}").json()
        assert running["state"] == "running" and running["expires_at"] is None
        assert running["subtasks"][0]["state"] == "running"
        assert (workspaces / long_job["id"]).is_dir()

        # Once it ends (cancelled), it expires like the others.
        assert http.delete(f"/v1/jobs/{long_job['id']}").status_code == 202
        wait_until(lambda: _gone(http, long_job["id"]), 60, interval=0.2, what="cancelled job to expire")
        # (the job made again with the key ran and expired meanwhile, or does so now)
        wait_until(lambda: http.get("/v1/jobs").json()["jobs"] == [], 60, interval=0.2, what="every job expired")


def _gc(router: Cluster, *args: str, token: str = ADMIN_TOKEN) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in router.env().items() if k != "EDGEFLEET_TOKENS"}
    return subprocess.run(
        [sys.executable, "-m", "edgefleet", "gc", "--url", router.url, "--token", token, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(ROOT),
    )


def test_gc_command_deletes_finished_jobs_only(router_only: Cluster) -> None:
    """No workers: submitted jobs stay running; the cancelled ones are the finished ones."""
    with router_only.client() as http:
        jobs = [http.post("/v1/jobs", json=COUNT).json()["id"] for _ in range(5)]
        cancelled, running = jobs[:3], jobs[3:]
        for job_id in cancelled:
            assert http.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"

        # Finished jobs written before the finished index existed are found and indexed once.
        client = router_only.redis.client()
        client.zrem("ef:finished", cancelled[0])
        store = JobStore(client)
        assert store.index_finished() == 1 and store.index_finished() == 0

        kept = _gc(router_only, "--older-than", "1h")
        assert kept.returncode == 0, kept.stderr
        assert "removed 0 finished job(s) older than 3600s" in kept.stdout
        refused = _gc(router_only, "--older-than", "0", token="alice-token")
        assert refused.returncode == 2 and refused.stderr.startswith("error: Authorization:"), refused.stderr
        bad = _gc(router_only, "--older-than", "soon")
        assert bad.returncode == 2 and bad.stderr.startswith("error: --older-than:"), bad.stderr
        assert all(not _gone(http, job_id) for job_id in jobs)

        done = _gc(router_only, "--older-than", "0", "--json")
        assert done.returncode == 0, done.stderr
        assert sorted(json.loads(done.stdout)["removed"]) == sorted(cancelled)
        assert [job_id for job_id in jobs if _gone(http, job_id)] == cancelled
        assert sorted(job["id"] for job in http.get("/v1/jobs").json()["jobs"]) == sorted(running)
        for job_id in cancelled:
            assert _job_keys(router_only, job_id) == [] and _indexed(router_only, job_id) == []
        for job_id in running:
            assert http.get(f"/v1/jobs/{job_id}").json()["state"] == "running"


def test_gc_endpoint_works_in_batches(router_only: Cluster) -> None:
    with router_only.client() as http:
        jobs = [http.post("/v1/jobs", json=COUNT).json()["id"] for _ in range(5)]
        for job_id in jobs:
            http.delete(f"/v1/jobs/{job_id}")
        first = http.post("/v1/admin/gc", json={"older_than": 0, "limit": 2})
        assert first.status_code == 200, first.text
        assert len(first.json()["removed"]) == 2 and first.json()["remaining"] == 3
        rest = http.post("/v1/admin/gc", json={"older_than": 0})
        assert sorted(first.json()["removed"] + rest.json()["removed"]) == sorted(jobs)
        assert rest.json()["remaining"] == 0
        # No body: the router's retention (7 days by default), so nothing is old enough.
        assert http.post("/v1/admin/gc").json() == {"removed": [], "remaining": 0, "older_than": 7 * 86400.0}
        bad = http.post("/v1/admin/gc", json={"older_than": "0"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "older_than", bad.text
    with router_only.client("alice-token") as http:
        assert http.post("/v1/admin/gc", json={}).status_code == 403


def test_workspace_sweep_keeps_running_and_recent_jobs(tmp_path: Path, router_only: Cluster) -> None:
    """The node's sweep on its own: only old folders of jobs finished or unknown to the store go."""
    from edgefleet.workers.workspace_gc import sweep_workspaces

    root = tmp_path / "workspaces"
    with router_only.client() as http:
        running = http.post("/v1/jobs", json=COUNT).json()["id"]
        finished = http.post("/v1/jobs", json=COUNT).json()["id"]
        http.delete(f"/v1/jobs/{finished}")
    unknown, recent = "a" * 32, "b" * 32
    slot = root / ".sandbox" / "slot1"
    slot.mkdir(parents=True)
    outside = tmp_path / "not-a-slot"
    outside.mkdir()
    for job_id in (running, finished, unknown, recent):
        (root / job_id / "step").mkdir(parents=True)
    (root / finished / "warm").symlink_to(slot, target_is_directory=True)
    (root / finished / "elsewhere").symlink_to(outside, target_is_directory=True)
    (root / "notes").mkdir()
    old = time.time() - 3600
    for job_id in (running, finished, unknown):
        os.utime(root / job_id, (old, old))
    os.utime(root / "notes", (old, old))

    store = JobStore(router_only.redis.client())
    removed = sweep_workspaces(root, store, retention=60)
    assert sorted(removed) == sorted([finished, unknown])
    assert sorted(p.name for p in root.iterdir()) == sorted([".sandbox", "notes", running, recent])
    assert not slot.exists(), "a warm launcher's folder linked from the job goes with it"
    assert outside.is_dir(), "a link to anywhere else is not followed"
