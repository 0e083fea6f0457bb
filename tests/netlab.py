"""A lab of separate hosts on one machine: network namespaces joined by veth links.

    laptop (the test) ──veth──┐
    box1: a worker node ──veth──┼── hub: a bridge (the LAN's switch) carrying the hub's address;
    box2: a worker node ──veth──┘        redis-server (password) and the router listen on it

Each box reaches the hub only over its own veth link (cut one with `Lab.cut`), and sees only
its own data folder: it runs in a private mount namespace where its host folder is bound onto
a path common to all boxes and the folder holding every box's (and the hub's) files is hidden
under an empty tmpfs. Nothing listens on a box's 127.0.0.1. The test process stays in the
host's namespaces and reaches the hub over its own link, as an operator's laptop would.

A link is cut in one of two ways: `unplug` (the hub's end of the veth goes down, so the box's
NIC loses carrier: its kernel drops what it sends at once and its TCP retries on a short local
timer) or `silent` (the switch port stops forwarding and both ends keep carrier: a cable cut or
a dead switch further away, where the box hears nothing and its TCP backs off exponentially).
Namespaces are named through a holder process (/proc/<pid>/ns/net), never by /run/netns after
they are made, since other tests may remount /run/netns meanwhile.

Everything the lab makes (namespaces, veths, routes, processes, files) is undone by `Lab.close`,
also when building it failed half-way; processes are stopped by PID (their process groups, then
whatever is left in each namespace).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

from tests.conftest import ADMIN_TOKEN, ROOT, TOKENS, redis_server_binary, stop_process, wait_until

LAB_PLUGINS = Path(__file__).parent / "lab_plugins"
REDIS_PORT = 6379  # the hub has its own port space: the usual port, as on a real hub
ROUTER_PORT = 8700
PROMETHEUS_PORT = 9090


def _netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def lab_unavailable() -> str | None:
    """Why the lab cannot be built here, or None."""
    if os.geteuid() != 0:
        return "the network lab needs root (network and mount namespaces)"
    for tool in ("ip", "bridge", "unshare", "nsenter", "mount", "ss"):
        if shutil.which(tool) is None:
            return f"the network lab needs `{tool}`"
    probe = f"efl-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass(frozen=True)
class Link:
    """A veth pair from a port of the hub's bridge to one host; `hub_if` is the end the lab cuts."""

    hub_if: str
    far_if: str
    far_address: str


@dataclass
class Box:
    name: str
    netns: str
    link: Link
    folder: Path  # the box's own data folder, as the host sees it
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class Lab:
    workdir: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:5])
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    env_overrides: dict[str, str] = field(default_factory=dict)
    logs_to: Path | None = None  # where the services' logs are copied when the lab is closed
    boxes: dict[str, Box] = field(default_factory=dict)
    router_proc: subprocess.Popen[bytes] | None = None
    redis_proc: subprocess.Popen[bytes] | None = None
    prometheus_proc: subprocess.Popen[bytes] | None = None
    _undo: list[Callable[[], None]] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)
    _holders: dict[str, int] = field(default_factory=dict)  # namespace -> PID of a process in it

    # --- layout ------------------------------------------------------------------------

    def __post_init__(self) -> None:
        # One LAN, 10.<a>.<b>.0/24: the hub .1, the laptop .2, box N .1N.
        self.net = f"10.{random.randint(16, 250)}.{random.randint(0, 255)}"
        self.hub_ns = f"efl-hub-{self.tag}"
        self.bridge = f"efl{self.tag}br"
        self.uplink = Link(f"efl{self.tag}h0", f"efl{self.tag}l0", f"{self.net}.2")
        # Every box's folder and the hub's files live under `private`, hidden from the boxes.
        self.private = self.workdir / "private"
        # Where each box sees its own folder (the same path on every box, like /var/lib/edgefleet).
        self.box_root = self.workdir / "box"

    @property
    def hub_address(self) -> str:
        """Where Redis and the router listen: the hub's address on its bridge."""
        return f"{self.net}.1"

    @property
    def broker_url(self) -> str:
        return f"redis://:{self.password}@{self.hub_address}:{REDIS_PORT}/0"

    @property
    def router_url(self) -> str:
        return f"http://{self.hub_address}:{ROUTER_PORT}"

    def marks_dir(self, box: str | None = None) -> Path:
        """The folder the `stamp` plugin may write (the same path on each box); with a box's
        name, that box's copy as the host sees it."""
        return (self.private / box if box else self.box_root) / "marks"

    # --- building and tearing down ------------------------------------------------------

    def build(self, *box_names: str) -> None:
        """The namespaces, links and folders. On any failure what was made is undone."""
        try:
            self._build(box_names)
        except BaseException:
            self.close()
            raise

    def _build(self, box_names: tuple[str, ...]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._undo.append(self._remove_workdir)
        # Plugins run as their own uid and reach the marks folder through these parents.
        self.workdir.chmod(0o755)
        self.private.mkdir(mode=0o700)
        self.box_root.mkdir(mode=0o755)
        (self.private / "hub").mkdir(mode=0o700)
        self._netns(self.hub_ns)
        self._run_in(self.hub_ns, "ip", "link", "add", self.bridge, "type", "bridge")
        self._run_in(self.hub_ns, "ip", "address", "add", f"{self.hub_address}/24", "dev", self.bridge)
        self._run_in(self.hub_ns, "ip", "link", "set", self.bridge, "up")
        self._veth(self.uplink, far_netns=None)
        for index, name in enumerate(box_names, start=1):
            netns = f"efl-{name}-{self.tag}"
            link = Link(f"efl{self.tag}h{index}", f"efl{self.tag}b{index}", f"{self.net}.{10 + index}")
            self._netns(netns)
            self._veth(link, far_netns=netns)
            folder = self.private / name
            (folder / "data").mkdir(parents=True)
            marks = folder / "marks"
            marks.mkdir()
            marks.chmod(0o1777)  # the plugin's uid appends its records; sticky like /tmp
            self.boxes[name] = Box(name, netns, link, folder)

    def _netns(self, name: str) -> None:
        """A namespace and a process that holds it: later steps name it by /proc/<holder>/ns/net,
        which stays valid even if another test remounts /run/netns under us."""
        _ip("netns", "add", name)
        self._undo.append(lambda: subprocess.run(["ip", "netns", "del", name], capture_output=True))
        holder = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "infinity"], start_new_session=True)
        self._holders[name] = holder.pid
        self._undo.append(lambda: stop_process(holder, signal.SIGKILL))
        self._namespaces.append(name)
        wait_until(lambda: _netns_inode(holder.pid) != _netns_inode(os.getpid()), 10, what=f"{name}'s holder")
        self._run_in(name, "ip", "link", "set", "lo", "up")

    def enter(self, netns: str) -> list[str]:
        """The command prefix that runs a program in `netns`."""
        return ["nsenter", f"--net=/proc/{self._holders[netns]}/ns/net"]

    def _run_in(self, netns: str | None, *cmd: str) -> None:
        done = subprocess.run([*(self.enter(netns) if netns else []), *cmd], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} in {netns or 'the host'}: {done.stderr.strip()}")

    def _veth(self, link: Link, far_netns: str | None) -> None:
        """A veth pair: `hub_if` a port of the hub's bridge, `far_if` in `far_netns` (None: the host)."""
        _ip("link", "add", link.hub_if, "type", "veth", "peer", "name", link.far_if)
        # Deleting either end deletes the pair; the host end outlives a deleted namespace.
        self._undo.append(lambda: subprocess.run(["ip", "link", "del", link.far_if], capture_output=True))
        _ip("link", "set", link.hub_if, "netns", str(self._holders[self.hub_ns]))
        self._run_in(self.hub_ns, "ip", "link", "set", link.hub_if, "master", self.bridge)
        self._run_in(self.hub_ns, "ip", "link", "set", link.hub_if, "up")
        if far_netns:
            _ip("link", "set", link.far_if, "netns", str(self._holders[far_netns]))
        self._run_in(far_netns, "ip", "address", "add", f"{link.far_address}/24", "dev", link.far_if)
        self._run_in(far_netns, "ip", "link", "set", link.far_if, "up")

    def _remove_workdir(self) -> None:
        if self.logs_to is not None:
            self.logs_to.mkdir(parents=True, exist_ok=True)
            for log in self.workdir.glob("*.log"):
                shutil.copy(log, self.logs_to / log.name)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def close(self) -> None:
        """Stop every process (by PID), then undo the network and the files, newest first."""
        for box in self.boxes.values():
            if box.proc is not None:
                stop_process(box.proc, timeout=15)
        for proc in (self.prometheus_proc, self.router_proc, self.redis_proc):
            if proc is not None:
                stop_process(proc, timeout=10)
        # Whatever a process left running in a namespace (a sandbox in its own session).
        inodes = {_netns_inode(pid) for pid in self._holders.values()} - {None, _netns_inode(os.getpid())}
        for pid in psutil.pids():
            if pid not in self._holders.values() and _netns_inode(pid) in inodes:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        while self._undo:
            self._undo.pop()()
        self._namespaces.clear()
        self._holders.clear()

    # --- services ------------------------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        env.update(
            {
                "PYTHONPATH": str(ROOT),
                # The password travels in the environment, never on a command line.
                "EDGEFLEET_REDIS_URL": self.broker_url,
                "EDGEFLEET_HEARTBEAT_INTERVAL": "0.5",
                "EDGEFLEET_HEARTBEAT_TTL": "3",
                "EDGEFLEET_REAP_INTERVAL": "0.5",
                "EDGEFLEET_LOG_LEVEL": "INFO",
                "EDGEFLEET_PLUGIN_DIRS": json.dumps([str(LAB_PLUGINS)]),
                "EDGEFLEET_PLUGIN_WRITE_PATHS": json.dumps({"stamp": [str(self.marks_dir())]}),
            }
        )
        env.update(self.env_overrides)
        return env

    def _log(self, name: str) -> Any:
        return open(self.workdir / f"{name}.log", "ab")

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def start_hub(self) -> None:
        """redis-server (its password in a config file, not argv) and the router, in the hub."""
        hub = self.private / "hub"
        conf = hub / "redis.conf"
        conf.touch(mode=0o600)
        conf.write_text(
            f"bind {self.hub_address}\nport {REDIS_PORT}\nrequirepass {self.password}\n"
            f'dir {hub}\nsave ""\nappendonly no\ndaemonize no\n'
        )
        self.redis_proc = subprocess.Popen(
            [*self.enter(self.hub_ns), redis_server_binary(), str(conf)],
            stdout=self._log("redis"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self._redis_answers, 15, what="redis-server in the hub")
        env = self._base_env()
        env.update(
            {
                "EDGEFLEET_TOKENS": json.dumps(TOKENS),
                "EDGEFLEET_ROUTER_HOST": self.hub_address,
                "EDGEFLEET_ROUTER_PORT": str(ROUTER_PORT),
                "EDGEFLEET_DATA_DIR": str(hub / "data"),
            }
        )
        self.router_proc = subprocess.Popen(
            [*self.enter(self.hub_ns), sys.executable, "-m", "edgefleet", "router"],
            env=env,
            stdout=self._log("router"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self._router_healthy, 60, interval=0.2, what="router in the hub")

    def _redis_answers(self) -> bool:
        if self.redis_proc is not None and self.redis_proc.poll() is not None:
            raise AssertionError(f"redis-server exited: {self.log_tail('redis')}")
        try:
            return bool(self.redis().ping())
        except redis.ConnectionError:
            return False

    def _router_healthy(self) -> bool:
        if self.router_proc is not None and self.router_proc.poll() is not None:
            raise AssertionError(f"router exited: {self.log_tail('router')}")
        try:
            return httpx.get(f"{self.router_url}/healthz", timeout=1, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def start_box(self, name: str, classes: str = "cpu") -> subprocess.Popen[bytes]:
        """`edgefleet worker` in the box's namespace, given the broker and nothing else of the hub."""
        return self._start_node(name, self._box_env(), "--classes", classes)

    def join_box(self, name: str, join_token: str, classes: str = "cpu") -> subprocess.Popen[bytes]:
        """`edgefleet worker --join <router>` with a join token (in its environment): the box gets
        its broker credentials from the router. Its metrics listen on its LAN address, which it
        then advertises (Prometheus in the hub scrapes it there)."""
        env = self._box_env()
        del env["EDGEFLEET_REDIS_URL"]  # the join hands out the box's own Redis user
        address = self.boxes[name].link.far_address
        env.update({"EDGEFLEET_JOIN_TOKEN": join_token, "EDGEFLEET_WORKER_METRICS_HOST": address})
        return self._start_node(name, env, "--join", self.router_url, "--classes", classes)

    def _box_env(self) -> dict[str, str]:
        env = self._base_env()
        env.update(
            {
                "EDGEFLEET_DATA_DIR": str(self.box_root / "data"),
                "EDGEFLEET_WORKER_METRICS_PORT": "0",
                "EDGEFLEET_CPU_CONCURRENCY": "1",
                "EDGEFLEET_NODE_BENCH": "false",
            }
        )
        env.update(self.env_overrides)  # a lab made with overrides (a benchmark) gets them on its boxes too
        return env

    def _start_node(self, name: str, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
        """`nsenter`, `unshare` and `sh` each exec the next: the Popen's PID is the node's."""
        box = self.boxes[name]
        # Bind the box's own folder onto the common path, then hide every host folder of the lab.
        script = 'mount --bind "$1" "$2" && mount -t tmpfs -o size=64k,mode=700 lab-hidden "$3" && shift 3 && exec "$@"'
        mount_then_run = ["sh", "-c", script, "sh", str(box.folder), str(self.box_root), str(self.private)]
        node = [sys.executable, "-m", "edgefleet", "worker", "--node-name", name, *args]
        box.proc = subprocess.Popen(
            [*self.enter(box.netns), "unshare", "--mount", "--propagation", "private", *mount_then_run, *node],
            env=env,
            stdout=self._log(f"node-{name}"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return box.proc

    def start_prometheus(self, reader_token: str) -> str:
        """A real Prometheus in the hub, finding nodes through the router's HTTP service discovery
        (scrape and refresh every second). Returns its URL."""
        from edgefleet.cli.side_services import SD_PATH, prometheus_config

        hub = self.private / "hub"
        token_file = hub / "prometheus.token"
        token_file.touch(mode=0o600)
        token_file.write_text(reader_token + "\n")
        config = hub / "prometheus.yml"
        config.write_text(
            prometheus_config(
                f"{self.hub_address}:{ROUTER_PORT}",
                token_file,
                [],
                scrape_interval="1s",
                discovery_url=f"{self.router_url}{SD_PATH}",
                discovery_refresh="1s",
            )
        )
        listen = f"{self.hub_address}:{PROMETHEUS_PORT}"
        self.prometheus_proc = subprocess.Popen(
            [
                *self.enter(self.hub_ns),
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={hub / 'tsdb'}",
                f"--web.listen-address={listen}",
            ],
            stdout=self._log("prometheus"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://{listen}"
        wait_until(lambda: self._answers(f"{url}/-/ready"), 60, interval=0.2, what="prometheus in the hub")
        return url

    def _answers(self, url: str) -> bool:
        try:
            return httpx.get(url, timeout=1, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_boxes_ready(self, *names: str, timeout: float = 90) -> None:
        """A box is ready once each class worker it runs is consuming (as `Cluster.wait_nodes_ready`)."""
        client = self.redis()

        def ready() -> bool:
            for name in names:
                proc = self.boxes[name].proc
                if proc is None or proc.poll() is not None:
                    raise AssertionError(f"box {name} exited: {self.log_tail('node-' + name)}")
                info = json.loads(client.get(f"ef:node:{name}") or "null") or {}
                if not info:
                    return False
                workers = len(info.get("classes", [])) + len(info.get("express_slots", {}))
                if self.log_tail(f"node-{name}", 10**7).count("ready.") < workers:
                    return False
            return True

        wait_until(ready, timeout, interval=0.2, what=f"boxes {names}")

    def process_tree(self, name: str) -> set[int]:
        """The PIDs of a box's node and the class workers it started (not pool children or sandboxes)."""
        proc = self.boxes[name].proc
        assert proc is not None
        node = psutil.Process(proc.pid)
        return {node.pid, *(child.pid for child in node.children())}

    # --- the network ---------------------------------------------------------------------

    def cut(self, name: str, *, silent: bool = False) -> None:
        """Cut the box off: unplug its cable at the hub (the box's NIC loses carrier) or, `silent`,
        stop the switch port forwarding (every frame vanishes; both ends keep carrier)."""
        port = self.boxes[name].link.hub_if
        if silent:
            self._run_in(self.hub_ns, "bridge", "link", "set", "dev", port, "state", "0")  # disabled
        else:
            self._run_in(self.hub_ns, "ip", "link", "set", port, "down")

    def mend(self, name: str) -> None:
        port = self.boxes[name].link.hub_if
        self._run_in(self.hub_ns, "ip", "link", "set", port, "up")
        self._run_in(self.hub_ns, "bridge", "link", "set", "dev", port, "state", "3")  # forwarding

    def shape(self, name: str, mbit: float) -> None:
        """Limit the box's link to `mbit` Mbit/s each way, like a real LAN's cable (a token bucket
        on both ends of its veth): the link, not the machine's CPUs, is then what a transfer waits on.
        The qdiscs go with the veth when the lab is closed."""
        link = self.boxes[name].link
        # Bucket of ~4 ms at the rate, at least 256 KiB: a veth hands over 64 KiB GSO frames, and a
        # bucket smaller than a timer tick's worth of bytes would cap the rate below `mbit`.
        burst = max(256 * 1024, int(mbit * 1e6 / 8 * 0.004))
        tbf = ["root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "20ms"]
        self._run_in(self.hub_ns, "tc", "qdisc", "replace", "dev", link.hub_if, *tbf)
        self._run_in(self.boxes[name].netns, "tc", "qdisc", "replace", "dev", link.far_if, *tbf)

    def listening_in(self, name: str) -> str:
        """`ss -ltn` inside a box's network namespace."""
        done = subprocess.run(
            [*self.enter(self.boxes[name].netns), "ss", "-Hltn"], capture_output=True, text=True, check=True
        )
        return done.stdout

    # --- clients (from the laptop) -------------------------------------------------------

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.broker_url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5)

    def http(self, token: str = ADMIN_TOKEN) -> httpx.Client:
        return httpx.Client(
            base_url=self.router_url, headers={"Authorization": f"Bearer {token}"}, timeout=30, trust_env=False
        )

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.http() as http:
            response = http.post("/v1/jobs", json=body)
        assert response.status_code in (200, 201), response.text
        return response.json()

    def job(self, job_id: str) -> dict[str, Any]:
        with self.http() as http:
            response = http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_job(self, job_id: str, timeout: float = 90) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            status = self.job(job_id)
            return status if status["state"] != "running" else None

        try:
            return wait_until(finished, timeout, interval=0.1, what=f"job {job_id}")
        except AssertionError:
            raise AssertionError(
                f"job {job_id} unfinished: {json.dumps(self.job(job_id), indent=1)}\n"
                + "\n".join(f"--- {n}\n{self.log_tail(n)}" for n in ["router", *(f"node-{b}" for b in self.boxes)])
            ) from None


def new_lab(logs_to: Path | None = None, **env_overrides: str) -> Lab:
    """A lab in a fresh folder under the system temp dir (whose parents a plugin's uid may traverse)."""
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-lab-"))
    return Lab(workdir=workdir, env_overrides=env_overrides, logs_to=logs_to)
