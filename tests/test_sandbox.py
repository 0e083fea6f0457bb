"""Sandbox escapes: each is contained and reported in the subtask's error, with and without bwrap."""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Cluster, RedisServer, free_port, wait_until

pytestmark = pytest.mark.cluster

PLUGINS = Path(__file__).parent / "sandbox_plugins"
HAVE_BWRAP = shutil.which("bwrap") is not None
# Node "boxed" uses bubblewrap when the machine has it; node "plain" never does.
NODES = ["boxed", "plain"]


@pytest.fixture(scope="module")
def sandbox_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("sandbox")
    server = RedisServer(port=free_port(), data_dir=workdir / "redis")
    server.start()
    cluster = Cluster(
        redis=server,
        workdir=workdir,
        env_overrides={"EDGEFLEET_PLUGIN_DIRS": json.dumps([str(PLUGINS)]), "EDGEFLEET_SANDBOX_KILL_GRACE": "1"},
    )
    try:
        cluster.start_router()
        cluster.start_node("boxed", classes="cpu")
        cluster.start_node("plain", classes="cpu", EDGEFLEET_SANDBOX="process")
        cluster.wait_nodes_ready(*NODES)
        yield cluster
    finally:
        cluster.stop()
        server.stop()


def run_step(cluster: Cluster, node: str, plugin: str, action: str, args: dict | None = None, **step: object) -> dict:
    job = cluster.submit(
        {"steps": [{"id": "x", "plugin": plugin, "action": action, "args": args or {}, "node": node, **step}]}
    )
    return cluster.wait_job(job["id"], timeout=90)


def failed_with(status: dict, *fragments: str) -> str:
    st = status["subtasks"][0]
    assert status["state"] == "failed" and st["state"] == "failed", status
    assert any(f in st["error"] for f in fragments), st["error"]
    return st["error"]


@pytest.fixture()
def listener() -> Iterator[tuple[int, list[bytes]]]:
    server = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            received.append(conn.recv(100))
            conn.close()

    stop = threading.Event()
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], received
    stop.set()
    thread.join()
    server.close()


@pytest.mark.parametrize("node", NODES)
def test_socket_without_network_permission_is_refused(sandbox_cluster: Cluster, node: str, listener) -> None:
    port, received = listener
    failed_with(run_step(sandbox_cluster, node, "escape", "open_socket", {"port": port}), "Permission denied")
    assert received == []
    permitted = run_step(sandbox_cluster, node, "netok", "open_socket", {"port": port})
    if node == "boxed" and HAVE_BWRAP:
        # `network` is the internet, never the host's loopback (its metrics, Redis, the router).
        assert permitted["state"] == "failed", permitted
        from edgefleet.workers.sandbox_net import network_available

        expected = "+net=slirp" if network_available() is None else "+net=none"
        assert permitted["subtasks"][0]["isolation"].endswith(expected), permitted["subtasks"][0]
        assert received == []
        return
    assert permitted["state"] == "succeeded", permitted  # without bwrap: the host's network, as documented
    wait_until(lambda: received == [b"hello"], 5, what="the permitted connection")


@pytest.mark.parametrize("node", NODES)
def test_spawning_a_process_without_subprocess_permission_is_refused(sandbox_cluster: Cluster, node: str) -> None:
    failed_with(run_step(sandbox_cluster, node, "escape", "spawn"), "Operation not permitted")


@pytest.mark.parametrize("node", NODES)
def test_fork_bomb_is_contained(sandbox_cluster: Cluster, node: str) -> None:
    failed_with(run_step(sandbox_cluster, node, "escape", "fork_bomb"), "Operation not permitted")


@pytest.mark.parametrize("node", NODES)
def test_memory_bomb_is_contained(sandbox_cluster: Cluster, node: str) -> None:
    status = run_step(sandbox_cluster, node, "escape", "memory_bomb")
    failed_with(status, "MemoryError", "memory limit")
    assert status["subtasks"][0]["max_rss_mb"] < 400


@pytest.mark.parametrize("node", NODES)
def test_cpu_spin_past_its_limit_is_killed(sandbox_cluster: Cluster, node: str) -> None:
    failed_with(run_step(sandbox_cluster, node, "escape", "cpu_spin"), "CPU time limit")


@pytest.mark.parametrize("node", NODES)
def test_file_over_the_size_limit_is_refused(sandbox_cluster: Cluster, node: str) -> None:
    failed_with(run_step(sandbox_cluster, node, "escape", "big_file"), "size limit", "File too large")


@pytest.mark.parametrize("node", NODES)
def test_environment_is_scrubbed(sandbox_cluster: Cluster, node: str) -> None:
    status = run_step(sandbox_cluster, node, "escape", "read_secret_env")
    names = status["subtasks"][0]["output"]["env"]
    assert not [n for n in names if n.startswith("EDGEFLEET_") and n != "EDGEFLEET_SANDBOX"]
    assert "HOME" in names


@pytest.mark.skipif(not HAVE_BWRAP, reason="writes outside the workspace are confined by bubblewrap")
def test_write_outside_the_workspace_is_refused(sandbox_cluster: Cluster, tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    status = run_step(sandbox_cluster, "boxed", "escape", "write_outside", {"path": str(target)})
    failed_with(status, "Read-only file system", "No such file or directory", "Permission denied")
    assert not target.exists()
    assert status["subtasks"][0]["isolation"].startswith("bwrap+")


@pytest.mark.parametrize("node", NODES)
def test_plugin_that_ignores_cancel_is_killed(sandbox_cluster: Cluster, node: str) -> None:
    job = sandbox_cluster.submit(
        {"steps": [{"id": "x", "plugin": "escape", "action": "ignore_cancel", "args": {"marker": "yes"}, "node": node}]}
    )
    wait_until(lambda: sandbox_cluster.job(job["id"])["subtasks"][0]["state"] == "running", 30, what="running")
    wait_until(lambda: sandbox_processes(sandbox_cluster, job["id"]), 10, what="the plugin seen in its workspace")
    with sandbox_cluster.client() as http:
        assert http.delete(f"/v1/jobs/{job['id']}").status_code == 202
    wait_until(
        lambda: sandbox_cluster.job(job["id"])["subtasks"][0]["state"] == "cancelled", 30, what="subtask cancelled"
    )
    assert not sandbox_processes(sandbox_cluster, job["id"])


@pytest.mark.parametrize("node", NODES)
def test_plugin_that_ignores_its_timeout_is_killed(sandbox_cluster: Cluster, node: str) -> None:
    status = run_step(sandbox_cluster, node, "escape", "ignore_cancel", timeout=1.5)
    failed_with(status, "timed out")
    assert not sandbox_processes(sandbox_cluster, status["id"])


def sandbox_processes(cluster: Cluster, job_id: str) -> list[psutil.Process]:
    """Processes still alive in the job's workspaces (the sandbox runs with its workspace as cwd;
    a warm launcher's workspace is the folder behind the link in the job's folder)."""
    job_dir = cluster.workdir / "data" / "workspaces" / job_id
    workspaces = {str(entry.resolve()) for entry in job_dir.iterdir()} if job_dir.exists() else set()
    assert workspaces, f"job {job_id} has no workspace"
    found = []
    for proc in psutil.process_iter():
        try:
            if any(proc.cwd().startswith(w) for w in workspaces):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def test_isolation_is_reported(sandbox_cluster: Cluster) -> None:
    plain = run_step(sandbox_cluster, "plain", "text", "count", {"text": "a b"})
    # What confined the file system (Landlock, or nothing on an old kernel), as which uid.
    assert re.fullmatch(
        r"(landlock|fs-unconfined)\+uid=(\d+|root-nocaps|worker)\+seccomp\+rlimits", plain["subtasks"][0]["isolation"]
    )
    boxed = run_step(sandbox_cluster, "boxed", "text", "count", {"text": "a b"})
    # `text` is `isolation: shared`: under bwrap its executor runs its subtasks in its own process.
    expected = (
        r"bwrap\+uid=(\d+|worker)\+seccomp\+rlimits\+shared-process" if HAVE_BWRAP else r"(landlock|fs-unconfined)\+.*"
    )
    assert re.fullmatch(expected, boxed["subtasks"][0]["isolation"])
    assert boxed["subtasks"][0]["cpu_seconds"] is not None


def _sandbox_starts(cluster: Cluster, node: str, plugin: str) -> dict[str, float]:
    with cluster.client() as http:
        [info] = [n for n in http.get("/v1/workers").json() if n["name"] == node]
    text = httpx.get(info["metrics_url"], timeout=5).text
    starts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "edgefleet_worker_sandbox_starts_total" and sample.labels["plugin"] == plugin:
                starts[sample.labels["start"]] = starts.get(sample.labels["start"], 0) + sample.value
    return starts


@pytest.mark.parametrize("node", NODES)
def test_steps_in_warm_launchers_pass_files_to_later_steps(sandbox_cluster: Cluster, node: str) -> None:
    """The first step of each job may take a launcher started while the previous job ran; its
    files reach the job's later step, which can read nothing else of the box."""
    texts = [f"note {i} on {node}" for i in range(4)]
    for text in texts:
        job = sandbox_cluster.submit(
            {
                "steps": [
                    {"id": "write", "plugin": "files", "action": "write", "args": {"text": text}, "node": node},
                    {
                        "id": "read",
                        "plugin": "files",
                        "action": "read",
                        "needs": ["write"],
                        "node": node,
                        "args": {"path": {"$ref": "steps.write.output.path"}},
                    },
                ]
            }
        )
        status = sandbox_cluster.wait_job(job["id"], timeout=60)
        assert status["state"] == "succeeded", status
        read = next(st for st in status["subtasks"] if st["id"] == "read")
        assert read["output"] == {"text": text}
    starts = _sandbox_starts(sandbox_cluster, node, "files")
    assert starts.get("warm", 0) >= 2, starts  # with 2 worker processes, most write steps ran warm
    assert sum(starts.values()) == 2 * len(texts)
    if node == "boxed" and HAVE_BWRAP:
        workspaces = sandbox_cluster.workdir / "data" / "workspaces"
        links = [p for p in workspaces.glob("*/write") if p.is_symlink()]
        assert links and all(p.resolve().parent == workspaces / ".sandbox" for p in links)


def test_a_killed_process_counts_as_ended_before_anyone_reaps_it() -> None:
    """A sandbox's killed processes are not the worker's children: the kill path must not wait for
    whoever inherits them to reap them (a recycled executor held its subtask's result for seconds)."""
    import signal
    import subprocess
    import sys

    from edgefleet.workers.sandbox import wait_ended

    # The parent starts a child and never waits for it: once killed, the child stays a zombie.
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, time; p = subprocess.Popen(['sleep', '300']); "
         "print(p.pid, flush=True); time.sleep(300)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        child.send_signal(signal.SIGKILL)
        # Longer than the test's own timeout: waiting for a reaping that never comes fails the test.
        wait_ended([child], timeout=3600)
        assert child.status() == psutil.STATUS_ZOMBIE  # ended, and nobody has reaped it
    finally:
        parent.kill()
        parent.wait()
