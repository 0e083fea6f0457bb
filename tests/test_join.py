"""A box joins with one command and its own credentials, on real processes.

The hub is `edgefleet up --listen <address>` (embedded Redis with a password, the router, a local
io worker); boxes are `edgefleet worker --join` processes with data dirs of their own. Checked:
the join (token from `edgefleet token create --worker`, a Redis ACL user per node, work run
under that user, the commands it may not run), revocation (connections closed, the node gone
from /v1/workers, its running subtask re-run elsewhere), refusals before anything starts (bad,
expired or missing token, unreachable router or broker), no secret in any command line, log,
/metrics or /v1/workers, and a join over rediss:// (TLS) with a CA made here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
import redis

from edgefleet.keys import KEY_TEMPLATES
from edgefleet.store.acl import ROUTER_ONLY_KEYS, store_key_patterns, worker_acl_rules
from edgefleet.store.jobs import JobStore
from tests.conftest import MARKER_DIR, ROOT, FakeInternet, free_port, new_marker, stop_process, wait_until

NODE_ENV = {
    "EDGEFLEET_HEARTBEAT_INTERVAL": "0.5",
    "EDGEFLEET_HEARTBEAT_TTL": "3",
    "EDGEFLEET_REAP_INTERVAL": "0.5",
    "EDGEFLEET_NODE_ACL_RECONCILE_INTERVAL": "0.5",
    "EDGEFLEET_WORKER_METRICS_PORT": "0",
    "EDGEFLEET_CPU_CONCURRENCY": "1",
    "EDGEFLEET_IO_CONCURRENCY": "2",
    "EDGEFLEET_NODE_BENCH": "false",
    "EDGEFLEET_LOG_LEVEL": "INFO",
    "EDGEFLEET_PLUGIN_WRITE_PATHS": json.dumps({"sleep": [str(MARKER_DIR)]}),
}


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(NODE_ENV)
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@dataclass
class Box:
    """One `edgefleet worker --join` process with a data dir of its own."""

    name: str
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes]
    started: float  # wall clock, to compare with the job store's subtask times

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def credentials(self) -> dict[str, str]:
        path = self.data_dir / "node.env"
        return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


@dataclass
class Hub:
    """`edgefleet up --listen <host>`: where boxes join. `host` is beyond loopback (so Redis gets a
    password) but on a private veth only, never an interface the machine's network reaches."""

    workdir: Path
    data_dir: Path
    port: int
    host: str
    proc: subprocess.Popen[bytes] | None = None
    boxes: list[Box] = field(default_factory=list)
    redis_port: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "token").read_text().strip()

    @property
    def password(self) -> str:
        return (self.data_dir / "redis-password").read_text().strip()

    def redis(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.redis_port, password=self.password, decode_responses=True)

    def http(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token or self.admin_token}"}, timeout=30
        )

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "--url", self.url, "--token", self.admin_token, env=base_env(), timeout=timeout)

    def start(self) -> None:
        log = self.workdir / "up.log"
        args = ["--listen", self.host, "--port", str(self.port), "--data-dir", str(self.data_dir)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "up", *args, "--classes", "io", "--stop-timeout", "5"],
            env=base_env(EDGEFLEET_NODE_NAME="hub", COLUMNS="200"),
            stdout=open(log, "ab"),  # noqa: SIM115 - the process holds it
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"edgefleet up exited: {log.read_text()[-3000:]}")
            return "edgefleet is up" in log.read_text()

        wait_until(up, 120, interval=0.2, what="edgefleet up")
        self.redis_port = int(re.search(rf"listening on {re.escape(self.host)}:(\d+)", log.read_text()).group(1))  # type: ignore[union-attr]

    def create_token(self, name: str, *extra: str) -> str:
        done = self.cli("token", "create", "--worker", "--name", name, *extra)
        assert done.returncode == 0, done.stderr
        return re.findall(r"efj_[0-9a-f]+_[0-9a-f]+", done.stdout)[0]

    def join(self, name: str, token: str | None, *args: str, **env: str) -> Box:
        data_dir = self.workdir / f"box-{name}"
        log = self.workdir / f"node-{name}.log"
        extra = {"EDGEFLEET_DATA_DIR": str(data_dir), **env}
        if token is not None:
            extra["EDGEFLEET_JOIN_TOKEN"] = token
        started = time.time()
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "worker", "--join", self.url, "--node-name", name, *args],
            env=base_env(**extra),
            stdout=open(log, "ab"),  # noqa: SIM115 - the process holds it
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        box = Box(name, data_dir, log, proc, started)
        self.boxes.append(box)
        return box

    def wait_ready(self, box: Box, workers: int = 2) -> None:
        def ready() -> bool:
            if box.proc.poll() is not None:
                raise AssertionError(f"{box.name} exited {box.proc.returncode}: {box.log_text()[-3000:]}")
            return box.log_text().count("ready.") >= workers and box.name in self.live_nodes()

        wait_until(ready, 90, interval=0.2, what=f"box {box.name} ready")

    def live_nodes(self) -> list[str]:
        with self.http() as http:
            return [n["name"] for n in http.get("/v1/workers").json()]

    def submit(self, body: dict[str, Any]) -> str:
        with self.http() as http:
            response = http.post("/v1/jobs", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        with self.http() as http:
            return dict(http.get(f"/v1/jobs/{job_id}").json())

    def wait_job(self, job_id: str, timeout: float = 90) -> dict[str, Any]:
        return dict(wait_until(lambda: (j := self.job(job_id))["state"] != "running" and j, timeout, 0.1, job_id))

    def stop(self) -> None:
        for box in self.boxes:
            stop_process(box.proc, timeout=20)
        if self.proc is not None:
            stop_process(self.proc, signal.SIGINT, timeout=60)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, fake_internet: FakeInternet | None) -> Iterator[Hub]:
    if fake_internet is None:
        pytest.skip("needs root for a private veth address to listen on beyond loopback")
    workdir = tmp_path_factory.mktemp("join")
    hub = Hub(workdir=workdir, data_dir=workdir / "hub", port=free_port(), host=fake_internet.host_address)
    try:
        hub.start()
        yield hub
    finally:
        hub.stop()


def test_a_node_user_reaches_every_store_key_but_the_routers_own() -> None:
    assert set(KEY_TEMPLATES) >= ROUTER_ONLY_KEYS
    patterns = store_key_patterns("ef")
    for name, template in KEY_TEMPLATES.items():
        key = "ef:" + re.sub(r"[{][^}]*[}]", "x1", template)
        # fnmatch's * matches ':' as Redis's glob does
        assert any(fnmatchcase(key, p) for p in patterns) == (name not in ROUTER_ONLY_KEYS), name
    rules = worker_acl_rules("ef", db=3)
    assert "~ef:*" not in rules and "-@all" in rules
    # task events only: no remote control, through which any box could shut every worker down
    assert [r for r in rules if r.startswith("&")] == ["&/3.celeryev/*"]
    assert not {"+config", "+acl", "+keys", "+flushall", "+flushdb", "+debug", "+shutdown", "+module"} & set(rules)
    assert not [r for r in rules if r.startswith("+@") or r in ("+script", "+client", "allkeys", "~*")]


def node_connections(box: Box, redis_port: int) -> set[str]:
    """`ip:port` of each connection from the box's processes to Redis."""
    found: set[str] = set()
    root = psutil.Process(box.proc.pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port == redis_port:
                    found.add(f"{conn.laddr.ip}:{conn.laddr.port}")
        except psutil.NoSuchProcess:
            pass
    return found


def client_users(admin: redis.Redis) -> dict[str, str]:
    """Redis's own view: client address -> the user it authenticated as."""
    return {c["addr"]: c["user"] for c in admin.client_list()}


def every_cmdline() -> str:
    lines = []
    for proc in psutil.process_iter(["cmdline"]):
        lines.append(" ".join(proc.info["cmdline"] or []))
    return "\n".join(lines)


def assert_nowhere(secrets: dict[str, str], places: dict[str, str]) -> None:
    for what, secret in secrets.items():
        assert len(secret) >= 32, what
        for where, text in places.items():
            assert secret not in text, f"the {what} appears in {where}"


@pytest.mark.cluster
def test_a_box_joins_runs_work_as_its_own_user_and_is_shut_out_by_revoke(hub: Hub) -> None:
    out = hub.cli("token", "create", "--worker", "--name", "box1")
    assert out.returncode == 0, out.stderr
    token = re.findall(r"efj_[0-9a-f]+_[0-9a-f]+", out.stdout)[0]
    # The printed join command passes the token in the environment, never as an argument.
    assert f"EDGEFLEET_JOIN_TOKEN={token} edgefleet worker --join http" in out.stdout
    assert not re.search(r"--token \S*efj_", out.stdout)

    box = hub.join("box1", token, "--classes", "cpu")
    hub.wait_ready(box)
    assert f"joined {hub.url}" in box.log_text()
    env_file = box.data_dir / "node.env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    creds = box.credentials()
    broker = urlsplit(creds["EDGEFLEET_REDIS_URL"])
    user, password = broker.username, broker.password
    assert user is not None and user.startswith("ef-node-") and password
    assert broker.port == hub.redis_port
    assert creds["EDGEFLEET_WORKER_REMOTE_CONTROL"] == "false"

    # Work runs on the box: a cpu step (the hub serves io only). The first subtask's start
    # against the moment `worker --join` was launched is the join-to-work figure.
    job = hub.wait_job(hub.submit({"steps": [{"id": "up", "plugin": "text", "action": "transform",
                                              "args": {"text": "joined", "op": "upper"}}]}))  # fmt: skip
    assert job["state"] == "succeeded", job
    assert job["subtasks"][0]["node"] == "box1"
    print(f"\njoin -> first subtask started: {job['subtasks'][0]['started_at'] - box.started:.2f} s")

    # Every connection of the box's processes is the box's own user, none the default one.
    admin = hub.redis()
    users = client_users(admin)
    mine = node_connections(box, hub.redis_port)
    assert mine
    assert {users[a] for a in mine if a in users} == {user}
    assert "box1" in [n["name"] for n in hub.http().get("/v1/workers").json()]

    # What the box's user may not do.
    as_node = redis.Redis(host=hub.host, port=hub.redis_port, username=user, password=password, decode_responses=True)
    assert as_node.ping()
    forbidden: list[tuple[str, ...]] = [
        ("CONFIG", "GET", "*"),
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("KEYS", "*"),
        ("ACL", "LIST"),
        ("ACL", "SETUSER", "evil", "on", ">x", "+@all", "~*"),
        ("DEBUG", "SLEEP", "0"),
        ("SCRIPT", "FLUSH"),
        ("MODULE", "LIST"),
        ("CLIENT", "KILL", "USER", "default"),
        ("SHUTDOWN", "NOSAVE"),
        ("SET", "somebody-elses-key", "x"),
        # the router's own keys: admission records (no node mints itself a token) and signing secrets
        ("ZRANGE", "ef:joins", "0", "-1"),
        ("HGETALL", f"ef:join:{token.split('_')[1]}"),
        ("HSET", "ef:join:000000000000", "secret", "x"),
        ("HGETALL", "ef:webhook_secret:default"),
        # Celery remote control: a broadcast `shutdown` would stop every worker of the cluster
        ("PUBLISH", "/0.celery.pidbox", "{}"),
    ]
    for command in forbidden:
        with pytest.raises(redis.exceptions.NoPermissionError):
            as_node.execute_command(*command)
    assert admin.ping()  # SHUTDOWN was refused

    # No secret on a command line, in a log, in /metrics or /v1/workers.
    with hub.http() as http:
        metrics = http.get("/metrics").text
        workers = http.get("/v1/workers").text
    listing = hub.cli("token", "list")
    assert listing.returncode == 0 and "box1" in listing.stdout
    logs = {str(p): p.read_text(errors="replace") for p in hub.workdir.rglob("*.log")}
    logs.update({str(p): p.read_text(errors="replace") for p in (hub.data_dir / "logs").iterdir()})
    assert_nowhere(
        {"join token": token, "ACL password": password, "node token": creds["EDGEFLEET_NODE_TOKEN"]},
        {"a command line": every_cmdline(), "/metrics": metrics, "/v1/workers": workers,
         "token list": listing.stdout, **logs},
    )  # fmt: skip

    # Redis forgets ACL users when it restarts: the router makes the node's user again from the
    # digest it keeps, and the box reconnects by itself (deleting the user stands in for the
    # restart: it also drops the user's connections).
    admin.acl_deluser(user)
    wait_until(lambda: user in admin.acl_users(), 30, what="the router to remake the node's user")
    wait_until(lambda: user in client_users(admin).values(), 60, what="box1 to reconnect")

    # A running subtask when the box is revoked: it runs again on another box once its lease ends.
    marker = new_marker("revoked")
    running = hub.submit({"steps": [{"id": "nap", "plugin": "sleep", "action": "sleep", "retries": 0,
                                     "args": {"seconds": 4, "marker": str(marker)}}]})  # fmt: skip
    wait_until(lambda: marker.exists(), 60, what="the nap to start on box1")

    artifacts = JobStore(admin).artifacts
    secret_before = artifacts.node_secret()
    revoked = hub.cli("token", "revoke", "box1")
    assert revoked.returncode == 0, revoked.stderr
    assert "box1" in revoked.stdout
    # The box could read the artifact signing secret: it is replaced, so no credential it makes holds.
    assert artifacts.node_secret() != secret_before
    # At once: the user and its connections are gone, the node has left /v1/workers.
    assert user not in admin.acl_users()
    assert user not in client_users(admin).values()
    assert "box1" not in hub.live_nodes()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host=hub.host, port=hub.redis_port, username=user, password=password).ping()
    time.sleep(2)  # several heartbeat intervals: the box cannot write one any more
    assert "box1" not in hub.live_nodes()
    assert user not in client_users(admin).values()
    assert box.proc.poll() is None  # still running, shut out

    # Rejoining with the revoked token is refused; a new box with a new token takes the nap over.
    again = run_cli("worker", "--join", hub.url, env=base_env(EDGEFLEET_JOIN_TOKEN=token,
                    EDGEFLEET_DATA_DIR=str(hub.workdir / "again")))  # fmt: skip
    assert again.returncode == 1 and "join token revoked" in again.stderr, again.stderr
    token2 = hub.create_token("box2")
    box2 = hub.join("box2", token2, "--classes", "cpu")
    hub.wait_ready(box2)
    done = hub.wait_job(running)
    assert done["state"] == "succeeded", done
    nap = done["subtasks"][0]
    assert nap["node"] == "box2" and nap["attempt"] >= 2
    old = urlsplit(box2.credentials()["EDGEFLEET_REDIS_URL"])
    assert old.username not in (None, user)

    # A rejoin with a still-valid token: the same user, a new password (the old one is refused
    # from now on). A plain `edgefleet worker` on the box then runs on what the join kept.
    stop_process(box2.proc, timeout=30)
    rejoin = run_cli(
        "worker", "--join", hub.url, "--node-name", "box2", "--join-only",
        env=base_env(EDGEFLEET_JOIN_TOKEN=token2, EDGEFLEET_DATA_DIR=str(box2.data_dir)),
    )  # fmt: skip
    assert rejoin.returncode == 0 and "joined" in rejoin.stdout, rejoin.stderr
    new = urlsplit(box2.credentials()["EDGEFLEET_REDIS_URL"])
    assert new.username == old.username and new.password != old.password
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host=hub.host, port=hub.redis_port, username=old.username, password=old.password).ping()
    log = hub.workdir / "node-box2-plain.log"
    plain = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "worker", "--classes", "cpu"],
        env=base_env(EDGEFLEET_DATA_DIR=str(box2.data_dir)),
        stdout=open(log, "ab"),  # noqa: SIM115 - the process holds it
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    hub.boxes.append(Box("box2", box2.data_dir, log, plain, time.time()))
    wait_until(lambda: "box2" in hub.live_nodes(), 60, what="box2 back on its kept credentials")
    assert new.username in client_users(admin).values()


@pytest.mark.cluster
def test_a_join_that_fails_says_what_failed_and_starts_nothing(hub: Hub, tmp_path: Path) -> None:
    def join(token: str | None, url: str = hub.url, **env: str) -> subprocess.CompletedProcess[str]:
        extra = {"EDGEFLEET_DATA_DIR": str(tmp_path / "box"), **env}
        if token is not None:
            extra["EDGEFLEET_JOIN_TOKEN"] = token
        return run_cli("worker", "--join", url, "--node-name", "refused", env=base_env(**extra))

    def refused(done: subprocess.CompletedProcess[str], code: int, line: str) -> None:
        assert done.returncode == code, done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(line), done.stderr
        assert not (tmp_path / "box" / "node.env").exists()

    refused(join(None), 2, "error: join token: set EDGEFLEET_JOIN_TOKEN or pass --token-file")
    refused(join("let-me-in"), 1, f"error: join token: refused by {hub.url}")
    assert "not a join token" in join("let-me-in").stderr
    refused(join("efj_0123456789ab_" + "0" * 64), 1, "error: join token: refused by")
    assert "unknown join token" in join("efj_0123456789ab_" + "0" * 64).stderr
    real = hub.create_token("short", "--ttl", "1s")
    time.sleep(1.2)
    refused(join(real), 1, "error: join token: refused by")
    assert "expired" in join(real).stderr
    nobody = f"http://127.0.0.1:{free_port()}"
    refused(join(real, nobody), 1, f"error: router: cannot reach {nobody}")
    token_file = tmp_path / "no-such-file"
    done = run_cli("worker", "--join", hub.url, "--token-file", str(token_file), env=base_env())
    refused(done, 1, f"error: --token-file: cannot read {token_file}")

    # deploy/join.sh stops at a failed join: the reason, exit 1, no service installed.
    if os.geteuid() == 0:
        installed = [Path("/etc/systemd/system/edgefleet-worker.service"), Path("/etc/edgefleet/worker.env")]
        before = [p.exists() and p.stat().st_mtime for p in installed]
        script = [str(ROOT / "deploy" / "join.sh"), hub.url, "--name", "svc", "--data-dir", str(tmp_path / "svc")]
        script += ["--edgefleet", str(Path(sys.executable).parent / "edgefleet")]
        done = subprocess.run(script, env=base_env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "error: join token: set EDGEFLEET_JOIN_TOKEN" in done.stderr, done
        bad = base_env(EDGEFLEET_JOIN_TOKEN="efj_0123456789ab_" + "0" * 64)
        done = subprocess.run(script, env=bad, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done
        assert "error: join token: refused by" in done.stderr and "nothing was installed" in done.stderr
        assert [p.exists() and p.stat().st_mtime for p in installed] == before
        assert not (tmp_path / "svc" / "node.env").exists()

    # A router that hands out a broker where nothing listens: the join names the broker.
    port, dead = free_port(), free_port()
    router = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "router", "--port", str(port)],
        env=base_env(
            EDGEFLEET_REDIS_URL=f"redis://:{hub.password}@{hub.host}:{hub.redis_port}/0",
            EDGEFLEET_JOIN_BROKER_URL=f"redis://127.0.0.1:{dead}/0",
            EDGEFLEET_DATA_DIR=str(tmp_path / "router"),
        ),
        stdout=open(tmp_path / "router.log", "ab"),  # noqa: SIM115 - the process holds it
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: _healthy(f"http://127.0.0.1:{port}"), 60, what="second router")
        done = join(hub.create_token("dead-broker"), f"http://127.0.0.1:{port}")
    finally:
        stop_process(router)
    refused(done, 1, "error: broker: cannot reach redis://ef-node-")
    assert f"127.0.0.1:{dead}/0" in done.stderr and ":***@" in done.stderr
    assert "refused" not in hub.live_nodes()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.cluster
def test_redis_beyond_loopback_has_a_password_no_command_line_shows(hub: Hub) -> None:
    password_file = hub.data_dir / "redis-password"
    assert password_file.stat().st_mode & 0o777 == 0o600
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host=hub.host, port=hub.redis_port).ping()  # no password: refused
    assert hub.redis().ping()
    assert hub.redis().config_get("bind")["bind"] == hub.host
    assert hub.password not in every_cmdline()
    assert hub.password not in (hub.workdir / "up.log").read_text()


# --- rediss:// ------------------------------------------------------------------------------------


def _redis_with_tls() -> str | None:
    found = shutil.which("redis-server")
    if found is None:
        return None
    version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    return found if "v=6" in version or "v=7" in version or "v=8" in version else None


def _make_ca(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it, made with openssl."""
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
            "-days", "2", "-subj", "/CN=edgefleet test CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return ca, cert, key


@pytest.mark.cluster
def test_a_box_joins_over_rediss_with_the_routers_ca(tmp_path: Path) -> None:
    binary = _redis_with_tls()
    if binary is None or shutil.which("openssl") is None:
        pytest.skip("needs a redis-server (Debian's is built with TLS) and openssl")
    ca, cert, key = _make_ca(tmp_path)
    tls_port, password = free_port(), "tls-admin-" + "x" * 32
    # Built before anything starts: the `finally` below stops the hub, the router and this server.
    hub = Hub(workdir=tmp_path, data_dir=tmp_path / "hub", port=free_port(), host="127.0.0.1")
    server = subprocess.Popen(
        [binary, "--port", "0", "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path), "-"],
        stdin=subprocess.PIPE,
        stdout=open(tmp_path / "redis.log", "ab"),  # noqa: SIM115 - the process holds it
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert server.stdin is not None
    server.stdin.write(
        f"requirepass {password}\ntls-port {tls_port}\ntls-cert-file {cert}\ntls-key-file {key}\n"
        f"tls-ca-cert-file {ca}\ntls-auth-clients no\n".encode()
    )
    server.stdin.close()
    admin_url = f"rediss://:{password}@127.0.0.1:{tls_port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    admin = redis.Redis.from_url(admin_url, decode_responses=True)
    router: subprocess.Popen[bytes] | None = None
    try:
        try:
            wait_until(lambda: _pings(admin, server, tmp_path / "redis.log"), 15, what="redis-server with TLS")
        except _NoTls as exc:
            pytest.skip(f"this redis-server has no TLS: {exc}")
        hub.data_dir.mkdir()
        (hub.data_dir / "token").write_text("tls-admin-token")
        router = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "router", "--port", str(hub.port)],
            env=base_env(
                EDGEFLEET_REDIS_URL=admin_url,
                EDGEFLEET_TOKENS=json.dumps({"tls-admin-token": {"scopes": ["admin"]}}),
                EDGEFLEET_DATA_DIR=str(hub.data_dir),
            ),
            stdout=open(tmp_path / "router.log", "ab"),  # noqa: SIM115 - the process holds it
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(lambda: _healthy(hub.url), 60, what="router on rediss")
        box = hub.join("tlsbox", hub.create_token("tlsbox"), "--classes", "cpu")
        hub.wait_ready(box)
        creds = box.credentials()
        assert creds["EDGEFLEET_REDIS_URL"].startswith("rediss://ef-node-")
        assert "ssl_ca_certs=" in creds["EDGEFLEET_REDIS_URL"]
        assert (box.data_dir / "broker-ca.pem").read_text() == ca.read_text()
        job = hub.wait_job(hub.submit({"steps": [{"id": "t", "plugin": "text", "action": "transform",
                                                  "args": {"text": "tls", "op": "upper"}}]}))  # fmt: skip
        assert job["state"] == "succeeded" and job["subtasks"][0]["node"] == "tlsbox", job
        user = urlsplit(creds["EDGEFLEET_REDIS_URL"]).username
        assert user in {c["user"] for c in admin.client_list()}
    finally:
        hub.stop()
        if router is not None:
            stop_process(router)
        stop_process(server)


class _NoTls(Exception):
    pass


def _pings(client: redis.Redis, server: subprocess.Popen[bytes], log: Path) -> bool:
    if server.poll() is not None:
        said = log.read_text(errors="replace")[-500:]
        if "tls" in said.lower():  # e.g. "Bad directive" for tls-port: built without TLS
            raise _NoTls(said)
        raise AssertionError(f"redis-server exited with code {server.returncode}: {said}")
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
