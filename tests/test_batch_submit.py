"""Batch submission (`POST /v1/jobs:batch`, `Client.submit_many`, `edgefleet submit --batch`) and
the lean single-job answer, on one real cluster (router + one cpu,io node) for the module."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from edgefleet.client import Client
from tests.conftest import ADMIN_TOKEN, ROOT, Cluster, RedisServer, free_port, stop_process, wait_until

pytestmark = pytest.mark.cluster


def _count(text: str) -> dict[str, Any]:
    return {"steps": [{"id": "count", "plugin": "text", "action": "count", "args": {"text": text}}]}


def _unknown_plugin() -> dict[str, Any]:
    return {"steps": [{"id": "x", "plugin": "no-such-plugin", "action": "run", "args": {}}]}


def _batch(cluster: Cluster, jobs: list[Any]) -> httpx.Response:
    with cluster.client() as http:
        return http.post("/v1/jobs:batch", json={"jobs": jobs})


def _job_count(cluster: Cluster) -> int:
    return sum(1 for key in cluster.redis.client().scan_iter("ef:job:*") if key.count(":") == 2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("batch")
    server = RedisServer(port=free_port(), data_dir=workdir / "redis")
    server.start()
    # No node benchmark: it takes the CPU this module's jobs need, and no placement here uses it.
    made = Cluster(redis=server, workdir=workdir, env_overrides={"EDGEFLEET_NODE_BENCH": "false"})
    try:
        made.start_router()
        made.start_node("batch")
        made.wait_nodes_ready("batch")
        yield made
    finally:
        made.stop()
        server.stop()


def test_all_valid_batch_creates_every_job_and_they_run(cluster: Cluster) -> None:
    texts = [" ".join(["w"] * n) for n in range(1, 7)]
    response = _batch(cluster, [_count(t) for t in texts])
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["created"], answer["existing"], answer["rejected"]) == (6, 0, 0)
    assert [r["index"] for r in answer["results"]] == list(range(6))
    assert all(r["status"] == 201 and r["created"] and r["state"] == "running" for r in answer["results"])
    ids = [r["id"] for r in answer["results"]]
    assert len(set(ids)) == 6
    for n, job_id in enumerate(ids, start=1):
        done = cluster.wait_job(job_id)
        assert done["state"] == "succeeded", (done["error"], done["subtasks"][0]["error"])
        assert done["subtasks"][0]["output"]["words"] == n


def test_a_bad_job_refuses_only_itself_named_by_its_index(cluster: Cluster) -> None:
    before = _job_count(cluster)
    jobs: list[Any] = [_count("a"), {"steps": [{"id": "s", "plugin": "text"}]}, _count("b"), _unknown_plugin(), "x"]
    answer = _batch(cluster, jobs).json()
    assert (answer["created"], answer["rejected"]) == (2, 3)
    results = answer["results"]
    assert results[3]["status"] == 422 and results[3]["error"] == "invalid_plan" and results[3]["id"] is None
    assert [d["field"] for d in results[3]["detail"]] == ["jobs.3.steps.0.plugin"]
    assert "no-such-plugin" in results[3]["detail"][0]["reason"]
    assert results[1]["error"] == "invalid_request"
    assert {d["field"] for d in results[1]["detail"]} >= {"jobs.1.steps.0.action"}
    assert results[4]["detail"] == [{"field": "jobs.4", "reason": "must be a JSON object (a job body)"}]
    assert _job_count(cluster) == before + 2
    for index in (0, 2):
        assert cluster.wait_job(results[index]["id"])["state"] == "succeeded"


def test_idempotency_keys_within_and_across_batches(cluster: Cluster) -> None:
    same, other = f"k-{uuid.uuid4().hex}", f"k-{uuid.uuid4().hex}"
    jobs = [
        {**_count("one"), "idempotency_key": same},
        {**_count("two"), "idempotency_key": other},
        {**_count("one"), "idempotency_key": same},  # the same body again: the same job
        {**_count("three"), "idempotency_key": other},  # another body: refused
        {**_count("x"), "idempotency_key": ""},
    ]
    first = _batch(cluster, jobs).json()["results"]
    assert first[0]["created"] is True and first[2]["created"] is False and first[2]["status"] == 200
    assert first[0]["id"] == first[2]["id"] != first[1]["id"]
    assert first[3]["error"] == "idempotency_conflict"
    assert first[3]["detail"][0]["field"] == "jobs.3.idempotency_key"
    assert first[4]["detail"][0]["field"] == "jobs.4.idempotency_key"
    # The whole batch again: nothing new, the same jobs.
    again = _batch(cluster, jobs).json()
    assert (again["created"], again["existing"]) == (0, 3)
    assert [r["id"] for r in again["results"]] == [r["id"] for r in first]
    # A key of a batch is the same key for POST /v1/jobs.
    single = cluster.submit(_count("one"), **{"Idempotency-Key": same})
    assert single["id"] == first[0]["id"]
    assert cluster.wait_job(first[0]["id"])["state"] == "succeeded"


def test_a_batch_that_is_no_list_of_jobs_or_too_long_creates_nothing(cluster: Cluster) -> None:
    before = _job_count(cluster)
    too_many = _batch(cluster, [_count("a")] * 501)  # EDGEFLEET_BATCH_MAX_JOBS defaults to 500
    assert too_many.status_code == 422
    assert too_many.json()["detail"] == [{"field": "jobs", "reason": "at most 500 jobs in one batch; this one has 501"}]
    assert _batch(cluster, []).json()["detail"][0]["field"] == "jobs"
    with cluster.client() as http:
        not_a_list = http.post("/v1/jobs:batch", json={"jobs": {"steps": []}})
        stray = http.post("/v1/jobs:batch", json={"jobs": [_count("a")], "priority": "batch"})
    assert not_a_list.status_code == 422 and not_a_list.json()["detail"][0]["field"] == "jobs"
    assert stray.status_code == 422 and stray.json()["detail"][0]["field"] == "priority"
    assert _job_count(cluster) == before


def test_single_submit_answers_the_created_status_without_reading_it_back(cluster: Cluster) -> None:
    body = {
        "name": "lean",
        "deadline_s": 60.0,
        "steps": [
            {"id": "a", "plugin": "text", "action": "count", "args": {"text": "a b"}},
            {"id": "b", "plugin": "text", "action": "count", "args": {"text": "c"}, "needs": ["a"]},
        ],
    }
    with cluster.client() as http:
        response = http.post("/v1/jobs", json=body)
    assert response.status_code == 201 and response.headers["content-type"] == "application/json"
    created = response.json()
    assert response.headers["location"] == f"/v1/jobs/{created['id']}"
    stored = cluster.job(created["id"])
    # The answer agrees with the store on what the create wrote.
    for field in ("id", "name", "priority", "tenant", "created_at", "deadline_at"):
        assert created[field] == stored[field], field
    a, b = created["subtasks"]
    assert a["state"] in ("ready", "queued") and b["state"] == "waiting"
    assert (a["attempt"], a["max_attempts"], b["needs"]) == (1, stored["subtasks"][0]["max_attempts"], ["a"])
    assert cluster.wait_job(created["id"])["state"] == "succeeded"


def test_client_submit_many_chunks_and_numbers_from_the_first_body(cluster: Cluster) -> None:
    bodies = [_count("a"), _count("b c"), _count("d"), _unknown_plugin(), _count("e f g")]
    progress: list[tuple[int, int]] = []
    with Client(cluster.url, ADMIN_TOKEN) as client:
        items = client.submit_many(bodies, chunk_size=2, on_progress=lambda done, total: progress.append((done, total)))
    assert progress == [(2, 5), (4, 5), (5, 5)]
    assert [item.index for item in items] == [0, 1, 2, 3, 4]
    assert [item.ok for item in items] == [True, True, True, False, True]
    bad = items[3].error
    assert bad is not None and bad.status == 422 and bad.detail[0]["field"] == "jobs.3.steps.0.plugin"
    words = [cluster.wait_job(str(item.id))["subtasks"][0]["output"]["words"] for item in items if item.ok]
    assert words == [1, 2, 1, 3]


def test_cli_submit_batch_prints_ids_and_names_refused_lines(cluster: Cluster, tmp_path: Path) -> None:
    lines = [json.dumps(_count("a b")), "", json.dumps(_unknown_plugin()), json.dumps(_count("c"))]
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env |= {"PYTHONPATH": str(ROOT), "EDGEFLEET_ROUTER_URL": cluster.url, "EDGEFLEET_TOKEN": ADMIN_TOKEN}
    env["EDGEFLEET_BATCH_MAX_JOBS"] = "2"  # two chunks
    run = subprocess.run(
        [sys.executable, "-m", "edgefleet", "submit", "--batch", str(jobs_file), "--priority", "batch"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(ROOT),
    )
    assert run.returncode == 2, run.stderr
    ids = run.stdout.split()
    assert len(ids) == 2
    assert f"{jobs_file}:3: 422 invalid_plan: jobs.1.steps.0.plugin" in run.stderr
    for job_id in ids:
        done = cluster.wait_job(job_id)
        assert done["state"] == "succeeded" and done["priority"] == "batch"
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(json.dumps(_count("a")) + "\n{not json\n")
    refused = subprocess.run(
        [sys.executable, "-m", "edgefleet", "submit", "--batch", str(bad_line)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(ROOT),
    )
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith(f"error: {bad_line}:2: not valid JSON")


def test_router_with_two_workers_shares_one_release_lease(cluster: Cluster) -> None:
    """`router --workers 2` in place of the module's router: two processes serve one port, one of
    them holds the release lease, and when it dies another takes it over; a batch runs through it."""
    redis = cluster.redis.client()
    cluster.stop_router()  # gives its lease back
    log = open(cluster.workdir / "router-workers.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "router", "--workers", "2"],
        env=cluster.env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        supervisor = psutil.Process(proc.pid)

        def workers() -> set[int]:
            # uvicorn's spawned workers (not multiprocessing's resource tracker)
            found = set()
            for child in supervisor.children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    if "resource_tracker" not in " ".join(child.cmdline()):
                        found.add(child.pid)
            return found

        wait_until(lambda: _healthy(cluster.url) and len(workers()) == 2, 60, what="two workers")

        def leader_pid() -> int | None:
            holder = redis.get("ef:scheduler:leader")
            return int(holder.split(":")[1]) if holder else None

        first = wait_until(leader_pid, 30, what="a release lease holder")
        assert first in workers()
        answer = _batch(cluster, [_count("x y")] * 4).json()
        assert answer["created"] == 4
        for result in answer["results"]:
            assert cluster.wait_job(result["id"])["state"] == "succeeded"
        # The leader dies: another worker takes the lease once it expires, uvicorn starts a new one.
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: (pid := leader_pid()) is not None and pid != first, 60, what="a new lease holder")
        assert leader_pid() in workers()
        wait_until(lambda: len(workers()) == 2 and first not in workers(), 60, what="uvicorn restarts the dead worker")
    finally:
        stop_process(proc, signal.SIGTERM)
        log.close()
        cluster.start_router()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
