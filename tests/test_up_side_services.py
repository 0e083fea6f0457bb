"""`edgefleet up`'s side services (Prometheus, Flower) never take the cluster down: one that cannot
start or exits is reported and restarted with back-off while the router, worker and Redis go on;
a missing extra or binary is one line and `up` runs without it. Commands whose extra is missing
say which one to install (exit code 2) instead of a ModuleNotFoundError."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from edgefleet.cli.extras import module_available
from edgefleet.cli.processes import RestartBackoff
from tests.conftest import ROOT, Cluster, free_port, stop_process, wait_until
from tests.test_cli import Up, _alive, cli_env, up_factory

__all__ = ["up_factory"]  # the fixture, shared with tests/test_cli.py

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the `prometheus` binary is not installed (apt-get install prometheus; .ci/run does)",
)


SITECUSTOMIZE = "import sys\nsys.modules['flower'] = None  # as if the `flower` extra were not installed\n"


def _children(up: Up, part: str) -> list[psutil.Process]:
    found = []
    for proc in up.record_children():
        try:
            if part in " ".join(proc.cmdline()) and _alive(proc):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def _one(up: Up, part: str) -> psutil.Process:
    procs = wait_until(lambda: _children(up, part) or None, 60, interval=0.2, what=f"a child running {part!r}")
    assert len(procs) == 1, [p.cmdline() for p in procs]
    return procs[0]


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.cluster
@needs_prometheus
def test_prometheus_that_cannot_start_or_dies_is_restarted_and_the_cluster_runs_on(
    up_factory: Callable[..., Up], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Flower asked for but its extra missing (blocked in every child's interpreter): one line, no Flower.
    blocker = tmp_path / "no-flower"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")])))
    prom_port = free_port()
    prom = f"http://127.0.0.1:{prom_port}"
    # The port is taken when `up` starts Prometheus: it exits at once.
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", prom_port))
    squatter.listen()
    try:
        up = up_factory(extra_args=("--with-prometheus", "--prometheus-port", str(prom_port), "--with-flower"))
        assert "prometheus exited with code" in up.output(), up.output()
        assert "restarting it in" in up.output()
    finally:
        squatter.close()
    warnings = [line for line in up.output().splitlines() if line.startswith("!")]
    assert "! flower is not installed (pip install 'edgefleet[flower]'): not starting Flower" in warnings, warnings
    assert _children(up, " flower") == []
    core = {name: _one(up, name) for name in ("redis-server", "edgefleet router", "edgefleet worker")}
    # No Flower, so no task events: the worker's environment does not turn them on.
    assert "EDGEFLEET_TASK_EVENTS" not in core["edgefleet worker"].environ()

    # Port free again: a restart (after its back-off) comes up and loads the alert rules.
    wait_until(lambda: _ready(f"{prom}/-/ready"), 90, interval=0.5, what="Prometheus after its restart")
    first = _one(up, "prometheus --config.file")
    rules = httpx.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
    names = {rule["name"] for group in rules for rule in group["rules"]}
    assert {"EdgefleetNodeDown", "EdgefleetBacklogGrowing", "EdgefleetInteractiveSlow"} <= names

    # Killed while running: reported, started again as a new process, nothing else touched.
    first.kill()
    wait_until(lambda: "exited with code -9" in up.output() or None, 30, what="up to report the exit")
    second = wait_until(
        lambda: next((p for p in _children(up, "prometheus --config.file") if p.pid != first.pid), None),
        90,
        interval=0.2,
        what="a new Prometheus process",
    )
    wait_until(lambda: _ready(f"{prom}/-/ready"), 60, interval=0.5, what="the restarted Prometheus")
    assert httpx.get(f"{up.url}/healthz", timeout=5).json()["status"] == "ok"
    for name, proc in core.items():
        assert _alive(proc), f"{name} died with Prometheus"
    assert {name: _one(up, name).pid for name in core} == {name: proc.pid for name, proc in core.items()}
    assert up.output().count("restarted (pid") >= 2  # once after the failed start, once after the kill

    # Ctrl-C still stops everything, the restarted Prometheus included.
    assert up.interrupt(timeout=60) == 0, up.output()
    wait_until(lambda: not _alive(second), 15, what="the restarted Prometheus to stop")
    assert not any(_alive(p) for p in core.values())


@pytest.mark.cluster
@pytest.mark.skipif(not module_available("flower"), reason="flower is not installed (pip install 'edgefleet[flower]')")
def test_flower_turns_task_events_on_in_workers_started_without_them(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    """docker-compose.yml's `flower` profile relies on this: workers run without task events (the
    default), and Flower enables them by Celery remote control while it runs."""
    cluster = cluster_factory()
    assert "EDGEFLEET_TASK_EVENTS" not in cluster.env()
    cluster.start_router()
    cluster.start_node("eventsnode")  # Flower starts meanwhile: it enables events every 5 s, for late workers too
    port = free_port()
    flower = f"http://127.0.0.1:{port}"
    env = {**cluster.env(), "FLOWER_UNAUTHENTICATED_API": "true"}
    # As in docker-compose.yml: no --broker, edgefleet.flower_app reads EDGEFLEET_REDIS_URL.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "edgefleet.flower_app",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
        ],
        env=env,
        stdout=open(tmp_path / "flower.log", "ab"),  # noqa: SIM115 - the process holds it
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=str(ROOT),
    )
    try:
        cluster.wait_nodes_ready("eventsnode")
        wait_until(lambda: _ready(f"{flower}/healthcheck"), 60, interval=0.3, what="flower")
        seen: list[str] = []

        def flower_saw_a_task() -> bool:
            # A job per round: the ones before Flower's enable_events call send no events.
            job = cluster.submit({"steps": [{"id": "c", "plugin": "text", "action": "count", "args": {"text": "a b"}}]})
            assert cluster.wait_job(job["id"])["state"] == "succeeded"
            tasks = httpx.get(f"{flower}/api/tasks", timeout=10).json()
            seen[:] = [t.get("name") for t in tasks.values()]
            return "text.count" in seen

        try:
            wait_until(flower_saw_a_task, 90, interval=1.0, what="a task event in Flower")
        except AssertionError:
            raise AssertionError(f"tasks {seen}; log: {(tmp_path / 'flower.log').read_text()[-2000:]}") from None
    finally:
        stop_process(proc)


def _run_blocked(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`edgefleet <args>` with `module` made unimportable, as on a box without its extra."""
    code = (
        f"import sys; sys.modules[{module!r}] = None; sys.argv = ['edgefleet', *{list(args)!r}]; "
        "from edgefleet.cli import main; main()"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=60, cwd=str(ROOT)
    )


@pytest.mark.parametrize(
    ("module", "args", "extra"),
    [
        ("uvicorn", ["router"], "router"),
        ("fastapi", ["router", "--port", "1"], "router"),
        ("fastapi", ["up"], "router"),
        ("celery", ["worker"], "worker"),
    ],
)
def test_a_command_without_its_extra_says_which_to_install(module: str, args: list[str], extra: str) -> None:
    done = _run_blocked(module, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"error: edgefleet {args[0]}: no module named {module!r}: install edgefleet with its '{extra}' extra: "
        f"pip install 'edgefleet[{extra}]'"
    ]
    assert "Traceback" not in done.stdout + done.stderr


def test_a_missing_module_of_edgefleet_itself_is_not_blamed_on_an_extra() -> None:
    done = _run_blocked("edgefleet.router.app", "router")
    assert done.returncode != 0 and "extra" not in done.stderr
    assert "ModuleNotFoundError" in done.stderr  # a broken checkout: the real error, not a hint


def test_restart_backoff_doubles_to_its_cap_and_resets_after_a_stable_run() -> None:
    backoff = RestartBackoff(first=1.0, cap=8.0, stable=60.0)
    assert [backoff.delay_after(0.5) for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert backoff.delay_after(61.0) == 1.0  # it ran a minute: a fresh failure, restarted quickly
    assert backoff.delay_after(3.0) == 2.0
