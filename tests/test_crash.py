"""Crashes lose no job and run nothing twice at once: pool child, whole node, long tasks, router, Redis."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from edgefleet.store.events import unpack_event
from tests.conftest import Cluster, new_marker, wait_until

pytestmark = pytest.mark.cluster


def events(cluster: Cluster, job_id: str) -> list[dict]:
    out = []
    for entry_id, fields in map(unpack_event, cluster.redis.client().lrange(f"ef:ev:{job_id}", 0, -1)):
        event = dict(fields)
        event["id"] = entry_id
        event.update(json.loads(fields.get("data", "{}")) or {})
        out.append(event)
    return out


def subtask_events(cluster: Cluster, job_id: str, subtask: str, state: str) -> list[dict]:
    return [e for e in events(cluster, job_id) if e.get("subtask") == subtask and e.get("state") == state]


def marker_lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def pool_process_running(cluster: Cluster, job_id: str, subtask_id: str) -> psutil.Process:
    """The Celery pool process whose sandboxed launcher runs this subtask right now: the one
    working in its workspace (warm launchers still waiting for work sit elsewhere)."""
    workspace = (cluster.workdir / "data" / "workspaces" / job_id / subtask_id).resolve()
    for proc in psutil.process_iter(["cmdline"]):
        if "sandbox_launcher" not in " ".join(proc.info["cmdline"] or []):
            continue
        try:
            if Path(proc.cwd()) != workspace:
                continue
            for parent in proc.parents():
                if "edgefleet.workers.class_worker" in " ".join(parent.cmdline()):
                    return parent
        except psutil.Error:
            continue
    raise AssertionError(f"no launcher runs {job_id}/{subtask_id}")


def sleep_job(marker: Path, seconds: float, **step: object) -> dict:
    return {
        "steps": [
            {
                "id": "slow",
                "plugin": "sleep",
                "action": "sleep",
                "args": {"seconds": seconds, "marker": str(marker)},
                **step,
            },
            {"id": "after", "plugin": "text", "action": "count", "args": {"text": "done"}, "needs": ["slow"]},
        ]
    }


def ready_cluster(cluster_factory: Callable[..., Cluster], *nodes: str, classes: str = "cpu,io", **env: str) -> Cluster:
    """A cluster (with `env` overrides) whose router and `nodes` (serving `classes`) are all up and ready."""
    cluster = cluster_factory(**env)
    cluster.start_router()
    for name in nodes:
        cluster.start_node(name, classes=classes)
    cluster.wait_nodes_ready(*nodes)
    return cluster


def submit_sleep_job(cluster: Cluster, marker: Path, seconds: float, **step: object) -> dict:
    """Submit `sleep_job` and return once its slow step has started (written its first marker line)."""
    job = cluster.submit(sleep_job(marker, seconds, **step))
    wait_until(lambda: marker_lines(marker), 30, what="first run")
    return job


def assert_succeeded_exactly_once(cluster: Cluster, job_id: str) -> dict:
    done = cluster.wait_job(job_id)
    assert done["state"] == "succeeded", done
    for st in done["subtasks"]:
        assert len(subtask_events(cluster, job_id, st["id"], "succeeded")) == 1
    job_ends = [e for e in events(cluster, job_id) if e["type"] == "job" and e.get("state") == "succeeded"]
    assert len(job_ends) == 1
    return done


def test_killed_pool_child_reruns_at_once_on_either_node(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    # Two nodes and a lease far longer than the rerun takes: the subtask must come back through
    # the dead process's own supervisor (a new attempt, at once) or through the redelivered
    # message taking the attempt over, whichever node that message reaches (an idle node used
    # to drop it as "running on node ..."), never by waiting for the lease to run out.
    lease_ttl = 30.0
    cluster = ready_cluster(cluster_factory, "a", "b", classes="cpu", EDGEFLEET_LEASE_TTL=str(lease_ttl))
    marker = new_marker("runs.txt")
    job = submit_sleep_job(cluster, marker, 3)
    pool_child = pool_process_running(cluster, job["id"], "slow")
    victim = cluster.job(job["id"])["subtasks"][0]["node"]
    seconds, micros = cluster.redis.client().time()
    killed_at = seconds + micros / 1e6
    pool_child.kill()

    done = assert_succeeded_exactly_once(cluster, job["id"])
    assert len(marker_lines(marker)) == 2
    slow = done["subtasks"][0]
    running = subtask_events(cluster, job["id"], "slow", "running")
    requeued = subtask_events(cluster, job["id"], "slow", "requeued")
    if requeued:  # the supervisor saw its pool child die and released the lease: a new attempt
        assert slow["attempt"] == 2 and len(requeued) == 1
        assert f"process {pool_child.pid} on node {victim} died" in requeued[0]["error"]
    else:  # the redelivery took the attempt over from the dead process
        assert slow["attempt"] == 1 and running[-1].get("takeover") == str(pool_child.pid)
    assert float(running[-1]["ts"]) - killed_at < lease_ttl  # not by lease expiry


def test_killed_node_work_runs_elsewhere_within_two_heartbeat_ttls(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    cluster = ready_cluster(cluster_factory, "a", "b", classes="cpu")
    marker = new_marker("runs.txt")
    job = submit_sleep_job(cluster, marker, 4)
    victim = cluster.job(job["id"])["subtasks"][0]["node"]
    survivor = "b" if victim == "a" else "a"
    seconds, micros = cluster.redis.client().time()
    killed_at = seconds + micros / 1e6
    cluster.kill_node(victim)

    done = assert_succeeded_exactly_once(cluster, job["id"])
    slow = done["subtasks"][0]
    assert slow["attempt"] == 2 and slow["node"] == survivor
    requeued = subtask_events(cluster, job["id"], "slow", "requeued")
    assert len(requeued) == 1 and victim in requeued[0]["error"]
    rerun = [e for e in subtask_events(cluster, job["id"], "slow", "running") if e["attempt"] == 2]
    heartbeat_ttl = 3.0
    assert float(rerun[0]["ts"]) - killed_at <= 2 * heartbeat_ttl
    assert [r[1] for r in marker_lines(marker)] == ["1", "2"]


def test_subtask_longer_than_visibility_timeout_never_runs_twice_at_once(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    cluster = cluster_factory()
    cluster.start_router()
    # Only this node runs with a tiny visibility timeout and fast restore sweeps, so that
    # Redis redelivers the message several times while the first run is still going.
    cluster.start_node(
        "n1",
        classes="cpu",
        EDGEFLEET_VISIBILITY_TIMEOUT="1.5",
        EDGEFLEET_MAX_SUBTASK_TIMEOUT="1",
        EDGEFLEET_BROKER_RESTORE_INTERVAL="1",
        EDGEFLEET_BROKER_RESTORE_THROTTLE="1",
        EDGEFLEET_CPU_CONCURRENCY="3",
    )
    cluster.wait_nodes_ready("n1")
    marker = new_marker("runs.txt")
    job = cluster.submit(sleep_job(marker, 8))
    assert_succeeded_exactly_once(cluster, job["id"])
    assert len(marker_lines(marker)) == 1
    log = cluster.log_tail("node-n1", 200_000)
    assert "delivery dropped" in log  # redelivery did happen, and was refused


def test_router_restart_mid_job_keeps_status(cluster_factory: Callable[..., Cluster], tmp_path: Path) -> None:
    cluster = ready_cluster(cluster_factory, "n1")
    marker = new_marker("runs.txt")
    job = submit_sleep_job(cluster, marker, 2, retries=1)
    before = cluster.job(job["id"])
    cluster.stop_router(signal.SIGKILL)
    time.sleep(3)  # the subtask ends while no router runs
    cluster.start_router()
    done = assert_succeeded_exactly_once(cluster, job["id"])
    assert done["created_at"] == before["created_at"]
    assert [st["id"] for st in done["subtasks"]] == ["slow", "after"]
    assert done["subtasks"][1]["output"]["words"] == 1
    assert len(marker_lines(marker)) == 1


def test_redis_restart_mid_job_loses_nothing(cluster_factory: Callable[..., Cluster], tmp_path: Path) -> None:
    # A message prefetched by a worker when the connection broke is stranded until the
    # visibility timeout; the reaper sends it again after `stranded_after`.
    cluster = ready_cluster(cluster_factory, "n1", EDGEFLEET_STRANDED_AFTER="3")
    marker = new_marker("runs.txt")
    job = cluster.submit(sleep_job(marker, 2))
    queued_behind = cluster.submit(sleep_job(new_marker("second.txt"), 0.2))
    wait_until(lambda: marker_lines(marker), 30, what="first run")
    cluster.redis.stop()
    time.sleep(1)
    cluster.redis.start()
    for job_id in (job["id"], queued_behind["id"]):
        done = cluster.wait_job(job_id, timeout=90)
        assert done["state"] == "succeeded", done


def test_sigterm_shuts_a_node_down_warm(cluster_factory: Callable[..., Cluster], tmp_path: Path) -> None:
    cluster = ready_cluster(cluster_factory, "n1", classes="cpu")
    node = cluster.nodes["n1"]
    marker = new_marker("runs.txt")
    job = submit_sleep_job(cluster, marker, 3)
    node.send_signal(signal.SIGTERM)  # the supervisor only, as systemd's KillMode=mixed does
    assert node.wait(60) == 0
    status = cluster.job(job["id"])
    slow = status["subtasks"][0]
    assert slow["state"] == "succeeded" and slow["attempt"] == 1  # finished, not abandoned
    assert not cluster.redis.client().exists("ef:node:n1")
    cluster.nodes.pop("n1")
    # The dependent was released but nobody serves cpu now; a new node picks it up.
    cluster.start_node("n2", classes="cpu")
    assert_succeeded_exactly_once(cluster, job["id"])
    assert len(marker_lines(marker)) == 1


def test_node_killed_mid_subtask_resumes_from_its_checkpoint(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    cluster = ready_cluster(cluster_factory, "a", "b", classes="cpu")
    marker = new_marker("ticks.txt")
    job = cluster.submit(
        {
            "steps": [
                {
                    "id": "count",
                    "plugin": "sleep",
                    "action": "tick",
                    "args": {"ticks": 30, "interval": 0.2, "marker": str(marker)},
                }
            ]
        }
    )
    wait_until(lambda: len(marker_lines(marker)) >= 5, 30, what="some ticks")
    cluster.kill_node(cluster.job(job["id"])["subtasks"][0]["node"])
    done = assert_succeeded_exactly_once(cluster, job["id"])
    st = done["subtasks"][0]
    assert st["attempt"] == 2 and st["resumed"] == 1
    assert st["output"]["started_from"] >= 5  # it did not start over
    ticks = [int(line[1]) for line in marker_lines(marker)]
    # Every tick ran; at most the one in flight at the kill ran twice.
    assert set(ticks) == set(range(30))
    assert len(ticks) - 30 <= 1
    assert subtask_events(cluster, job["id"], "count", "resumed")
