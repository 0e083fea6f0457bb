"""Faults that must cost nothing that finished: a Redis restart under running subtasks, a worker
process killed again and again, a plugin process killed from outside."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import Cluster, RedisServer, free_port, new_marker, wait_until
from tests.test_crash import events, marker_lines, ready_cluster, subtask_events

pytestmark = pytest.mark.cluster


def class_worker_pids(cluster: Cluster, node: str) -> dict[str, int]:
    """The node's Celery worker processes (one per class and lane), by command line."""
    supervisor = psutil.Process(cluster.nodes[node].pid)
    return {
        " ".join(p.cmdline()[3:]): p.pid
        for p in supervisor.children()
        if "edgefleet.workers.class_worker" in " ".join(p.cmdline())
    }


def launchers_in(workspace: Path) -> list[psutil.Process]:
    """The sandbox launcher processes working in `workspace` (the plugin process itself)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if "sandbox_launcher" not in " ".join(proc.info["cmdline"] or []):
            continue
        try:
            if Path(proc.cwd()) == workspace:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def pool_child_running(cluster: Cluster, job_id: str, subtask_id: str) -> psutil.Process | None:
    """The Celery pool process whose sandbox runs this subtask now, if one does."""
    workspace = (cluster.workdir / "data" / "workspaces" / job_id / subtask_id).resolve()
    for launcher in launchers_in(workspace):
        try:
            for parent in launcher.parents():
                if "edgefleet.workers.class_worker" in " ".join(parent.cmdline()):
                    return parent
        except psutil.Error:
            continue
    return None


@pytest.fixture(scope="module")
def lost_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cpu node whose leases (60 s) outlast every test here, so that only the lost-attempt
    paths (takeover, the supervisor's release, the runner's report) can bring work back in time."""
    workdir = tmp_path_factory.mktemp("lost")
    server = RedisServer(port=free_port(), data_dir=workdir / "redis")
    server.start()
    cluster = Cluster(
        redis=server,
        workdir=workdir,
        env_overrides={"EDGEFLEET_LEASE_TTL": "60", "EDGEFLEET_MAX_LOST_ATTEMPTS": "2"},
    )
    try:
        cluster.start_router()
        cluster.start_node("n1", classes="cpu")
        cluster.wait_nodes_ready("n1")
        yield cluster
    finally:
        cluster.stop()
        server.stop()


def sleep_step(marker: Path, seconds: float, **extra: object) -> dict:
    return {
        "id": "s",
        "plugin": "sleep",
        "action": "sleep",
        "args": {"seconds": seconds, "marker": str(marker)},
        **extra,
    }


def test_redis_killed_and_restarted_under_running_subtasks(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    # A lease longer than the outage: the running attempts must keep their subtasks.
    cluster = ready_cluster(cluster_factory, "n1", EDGEFLEET_LEASE_TTL="20", EDGEFLEET_STRANDED_AFTER="5")
    workers_before = class_worker_pids(cluster, "n1")
    # cpu subtasks run in prefork pool children, io ones in the threads pool of the io worker
    # (the one kombu's close-after-collect crash took down): both lanes are under the outage.
    markers = [new_marker(f"run{i}.txt") for i in range(5)]
    jobs = [
        cluster.submit({"steps": [sleep_step(m, 3, **({"resource_class": "io"} if i >= 2 else {}))]})
        for i, m in enumerate(markers)
    ]
    wait_until(lambda: all(marker_lines(m) for m in markers), 60, what="every plugin started")

    redis_proc = cluster.redis.proc
    assert redis_proc is not None
    os.kill(redis_proc.pid, signal.SIGKILL)
    redis_proc.wait(10)
    time.sleep(3)  # every plugin finishes while Redis is away
    cluster.redis.start()  # same port, same folder: the append-only file brings the state back

    for job in jobs:
        done = cluster.wait_job(job["id"], timeout=90)
        assert done["state"] == "succeeded", done
        step = done["subtasks"][0]
        assert step["attempt"] == 1 and step["output"]["attempt"] == 1
        assert len(subtask_events(cluster, job["id"], "s", "running")) == 1
    # No plugin that had finished ran a second time.
    assert [len(marker_lines(m)) for m in markers] == [1] * len(markers)
    # The Celery workers survived the broker restart on their own: same processes, no restart.
    assert class_worker_pids(cluster, "n1") == workers_before
    log = cluster.log_tail("node-n1", 1_000_000)
    assert "Unrecoverable error" not in log and "class worker exited" not in log
    assert "job store unreachable; the plugin keeps running" in log  # the outage did hit running attempts


def test_worker_killed_under_a_subtask_again_and_again_fails_it_after_the_bound(lost_cluster: Cluster) -> None:
    # What a plugin that kills its worker did (`os.kill(os.getppid(), 9)`, issue 9; the sandbox
    # now runs plugins as another uid, so the test does the killing): the pool child dies under
    # the subtask each time it runs, and used to be re-run forever at the same attempt.
    cluster = lost_cluster
    marker = new_marker("runs.txt")
    job = cluster.submit({"steps": [sleep_step(marker, 30)]})
    killed: list[int] = []
    deadline = time.monotonic() + 90
    while cluster.job(job["id"])["state"] == "running" and time.monotonic() < deadline:
        child = pool_child_running(cluster, job["id"], "s")
        if child is not None and child.pid not in killed and len(marker_lines(marker)) > len(killed):
            child.kill()
            killed.append(child.pid)
        time.sleep(0.05)

    done = cluster.wait_job(job["id"], timeout=5)
    assert done["state"] == "failed", done
    assert "lost 3 times (worker died while running it)" in done["error"]
    assert done["subtasks"][0]["state"] == "failed"
    assert len(killed) == 3 and len(marker_lines(marker)) == 3  # the bound: 2 lost, then failed


def test_cancel_stops_a_subtask_whose_worker_died(lost_cluster: Cluster) -> None:
    cluster = lost_cluster
    marker = new_marker("runs.txt")
    job = cluster.submit({"steps": [sleep_step(marker, 30)]})
    wait_until(lambda: marker_lines(marker), 30, what="the plugin started")
    child = wait_until(lambda: pool_child_running(cluster, job["id"], "s"), 30, what="the subtask running")
    with cluster.client() as http:
        assert http.delete(f"/v1/jobs/{job['id']}").status_code == 202
    child.kill()  # the worker dies right after the cancel: its redelivery must not run it again

    wait_until(lambda: cluster.job(job["id"])["subtasks"][0]["state"] != "running", 30, what="subtask ended")
    time.sleep(3)  # a redelivery, a takeover or a requeue would have started it again by now
    status = cluster.job(job["id"])
    assert status["state"] == "cancelled"
    assert status["subtasks"][0]["state"] == "cancelled"
    assert len(marker_lines(marker)) == 1
    assert len(subtask_events(cluster, job["id"], "s", "running")) == 1


def test_killed_plugin_process_resumes_from_its_checkpoint_without_retries(lost_cluster: Cluster) -> None:
    cluster = lost_cluster
    marker = new_marker("ticks.txt")
    job = cluster.submit(
        {
            "steps": [
                {
                    "id": "count",
                    "plugin": "sleep",
                    "action": "tick",
                    "retries": 0,
                    "args": {"ticks": 20, "interval": 0.2, "marker": str(marker)},
                }
            ]
        }
    )
    wait_until(lambda: len(marker_lines(marker)) >= 4, 30, what="some ticks")
    workspace = (cluster.workdir / "data" / "workspaces" / job["id"] / "count").resolve()
    plugin = wait_until(lambda: launchers_in(workspace), 10, what="the plugin process")[0]
    plugin.kill()  # as the OOM killer does: SIGKILL from outside, no limit of its own

    done = cluster.wait_job(job["id"], timeout=60)
    assert done["state"] == "succeeded", done
    step = done["subtasks"][0]
    assert step["attempt"] == 2 and step["resumed"] == 1  # a new attempt, not a failure
    assert step["output"]["started_from"] >= 3  # attempt 2 saw the checkpoint
    requeued = subtask_events(cluster, job["id"], "count", "requeued")
    assert len(requeued) == 1 and "killed from outside" in requeued[0]["error"]
    assert not [e for e in events(cluster, job["id"]) if e.get("state") == "failed"]
    ticks = [int(line[1]) for line in marker_lines(marker)]
    assert set(ticks) == set(range(20))
