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
import psutil

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


class NodeCpu:
    """CPU seconds a worker node has used: its cgroup's account, or its living process tree's."""

    ROOTS = (Path("/sys/fs/cgroup/cpuacct"), Path("/sys/fs/cgroup"))

    def __init__(self, name: str) -> None:
        self.folder: Path | None = None
        self.pid = 0
        for root in self.ROOTS:
            folder = root / f"edgefleet-bench-{name}-{os.getpid()}"
            try:
                folder.mkdir()
            except OSError:
                continue
            if (folder / "cpuacct.usage").exists() or (folder / "cpu.stat").exists():
                self.folder = folder
                break
            folder.rmdir()

    def command(self, cmd: list[str]) -> list[str]:
        """`cmd`, started inside the cgroup (before it forks anything)."""
        if self.folder is None:
            return cmd
        return ["sh", "-c", f'echo $$ > {self.folder}/cgroup.procs && exec "$@"', "sh", *cmd]

    def seconds(self) -> float:
        if self.folder is None:
            return tree_cpu(self.pid)
        if (self.folder / "cpuacct.usage").exists():
            return int((self.folder / "cpuacct.usage").read_text()) / 1e9
        stat = dict(line.split() for line in (self.folder / "cpu.stat").read_text().splitlines())
        return int(stat["usage_usec"]) / 1e6

    def user_system(self) -> tuple[float, float] | None:
        """(user, system) CPU seconds from the cgroup's account; None without a cgroup."""
        if self.folder is None:
            return None
        if (self.folder / "cpuacct.stat").exists():
            ticks = dict(line.split() for line in (self.folder / "cpuacct.stat").read_text().splitlines())
            hz = os.sysconf("SC_CLK_TCK")
            return int(ticks["user"]) / hz, int(ticks["system"]) / hz
        stat = dict(line.split() for line in (self.folder / "cpu.stat").read_text().splitlines())
        return int(stat["user_usec"]) / 1e6, int(stat["system_usec"]) / 1e6

    def close(self) -> None:
        if self.folder is not None:
            try:
                self.folder.rmdir()
            except OSError:
                pass


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and everything below it, living or reaped (0 once it is gone)."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        except psutil.Error:
            continue
    return total


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
