"""What the benchmark scripts share: an embedded redis-server plus router and node processes,
started with one environment and stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from edgefleet.cli.embedded_redis import EmbeddedRedis, free_port
from edgefleet.store import JobStore

TOKEN = "bench-token"


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def wait_nodes(store: JobStore, *names: str, timeout: float = 60) -> None:
    """Until every named worker node has a live heartbeat."""
    wait_for(lambda: set(names) <= {n.name for n in store.nodes.live_nodes()}, timeout, "worker nodes")


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def sleep_plugin_copy(into: Path, *, name: str, isolation: str) -> Path:
    """A copy of the built-in `sleep` plugin named `name`, with `isolation: <isolation>` in its
    manifest, in the plugin folder `into` (returned; readable by a sandbox's uid)."""
    from edgefleet.plugin_catalog import builtin_plugin_dir

    folder = into / name
    shutil.copytree(builtin_plugin_dir() / "sleep", folder)
    manifest = folder / "plugin.yaml"
    text = manifest.read_text()
    if "name: sleep\n" not in text or "isolation: shared\n" not in text:
        raise SystemExit("the built-in sleep manifest changed: update loadtests/harness.sleep_plugin_copy")
    manifest.write_text(
        text.replace("name: sleep\n", f"name: {name}\n").replace("isolation: shared\n", f"isolation: {isolation}\n")
    )
    for path in [into, folder, *folder.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return into


class BenchStack:
    """A redis-server in `workdir`, and the environment every process of the stack gets:
    the bench token (admin), its own data dir, free ports, quiet logs, plus `overrides`."""

    def __init__(self, workdir: Path, **overrides: str) -> None:
        self.workdir = workdir
        self.server = EmbeddedRedis(workdir / "redis", port=free_port())
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        self.env.update(
            PYTHONPATH=str(Path(__file__).resolve().parent.parent),
            EDGEFLEET_TOKENS=json.dumps({TOKEN: {"scopes": ["admin"], "tenant": "bench"}}),
            EDGEFLEET_ROUTER_PORT=str(self.port),
            EDGEFLEET_DATA_DIR=str(workdir / "data"),
            EDGEFLEET_WORKER_METRICS_PORT="0",
            EDGEFLEET_LOG_LEVEL="WARNING",
            **overrides,
        )
        self.procs: list[subprocess.Popen[bytes]] = []

    def start_redis(self) -> str:
        self.server.start()
        self.env["EDGEFLEET_REDIS_URL"] = self.server.url
        return self.server.url

    def start_router(self) -> None:
        self.procs.append(start([sys.executable, "-m", "edgefleet", "router"], self.env, self.workdir / "router.log"))
        wait_for(lambda: healthy(self.url), 60, "router")

    def start_node(self, name: str, classes: str = "cpu", **overrides: str) -> None:
        cmd = [sys.executable, "-m", "edgefleet", "worker", "--node-name", name, "--classes", classes]
        self.procs.append(start(cmd, {**self.env, **overrides}, self.workdir / f"node-{name}.log"))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        self.server.stop()
