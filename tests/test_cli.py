"""The command line on real processes: `edgefleet up` runs a whole cluster, the client
commands talk to it, bad input gets exit code 2 and one line, Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
import redis
import yaml

from edgefleet.cli.embedded_redis import EmbeddedRedis
from edgefleet.client import ApiError, Client, _parse_sse
from tests.conftest import ROOT, free_port, wait_until

pytestmark = pytest.mark.cluster

SUBCOMMANDS = [
    "router", "worker", "up", "submit", "status", "jobs", "cancel", "fetch", "gc", "plugins", "workers",
    "token", "schedule", "models", "models pull",
]  # fmt: skip


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    # Seconds of CPU per node start that these tests do not look at (tests/test_node_bench.py does).
    env["EDGEFLEET_NODE_BENCH"] = "false"
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet", *args],
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
    )


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _processes_in_groups(pgids: set[int]) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) in pgids and _alive(proc):
                found.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


@dataclass
class Up:
    """One `edgefleet up` process (its own session) and what it wrote."""

    data_dir: Path
    port: int
    log_path: Path
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    recorded: list[psutil.Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = cli_env(
            EDGEFLEET_NODE_NAME="cli-test-node",
            EDGEFLEET_CPU_CONCURRENCY="2",
            EDGEFLEET_IO_CONCURRENCY="2",
            EDGEFLEET_HEARTBEAT_INTERVAL="0.5",
            EDGEFLEET_HEARTBEAT_TTL="3",
            EDGEFLEET_WORKER_METRICS_PORT="0",
        )
        assert "EDGEFLEET_REDIS_URL" not in env
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgefleet",
                "up",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                *self.extra_args,
            ],
            env=env,
            stdout=open(self.log_path, "ab"),  # noqa: SIM115 - the child holds it
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(ROOT),
        )
        wait_until(self._healthy, 90, interval=0.2, what="edgefleet up: router /healthz")
        # `up` announces itself once the worker node's heartbeat has arrived: a heading, the table
        # (with the token), then the "Try:" line, each its own write; wait for the last one.
        wait_until(
            lambda: self._check_running() and "edgefleet submit --demo" in self.output(),
            90,
            interval=0.2,
            what="edgefleet up: worker node",
        )

    def _check_running(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"edgefleet up exited with {self.proc.returncode}:\n{self.output()}{self.logs()}")
        return True

    def _healthy(self) -> bool:
        self._check_running()
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logs(self) -> str:
        out = []
        for path in sorted((self.data_dir / "logs").glob("*.log")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)

    @property
    def token(self) -> str:
        return (self.data_dir / "token").read_text().strip()

    def record_children(self) -> list[psutil.Process]:
        assert self.proc is not None
        self.recorded = psutil.Process(self.proc.pid).children(recursive=True)
        return self.recorded

    def interrupt(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"edgefleet up still running {timeout}s after SIGINT:\n{self.output()}") from None

    def kill_everything(self) -> None:
        """Test cleanup only: whatever is still alive of this run dies."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        for child in self.recorded:
            if _alive(child):
                child.kill()


@pytest.fixture()
def up_factory(tmp_path: Path) -> Iterator[callable]:
    made: list[Up] = []

    def make(data_dir: Path | None = None, extra_args: tuple[str, ...] = ()) -> Up:
        up = Up(
            data_dir=data_dir or tmp_path / "data",
            port=free_port(),
            log_path=tmp_path / f"up-{len(made)}.out",
            extra_args=extra_args,
        )
        made.append(up)
        up.start()
        return up

    yield make
    for up in made:
        up.kill_everything()


def test_up_submit_status_and_clean_shutdown(up_factory: callable, tmp_path: Path) -> None:
    up = up_factory()
    token_file = up.data_dir / "token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = up.token
    assert token and token in up.output()  # shown once to its owner
    auth = ["--url", up.url, "--token", token]

    # Submit a template job and wait for it: exit 0, the job id, then the outputs.
    done = run_cli("submit", "--template", "text-report", "--input", "text=a b a", "--wait", *auth)
    assert done.returncode == 0, done.stdout + done.stderr + up.logs()
    job_id = done.stdout.splitlines()[0].strip()
    assert len(job_id) == 32
    outputs = json.loads(done.stdout[done.stdout.index("{") :])
    assert outputs["shout"]["text"] == "A B A"
    assert outputs["count"]["words"] == 3

    # A YAML body with explicit steps and a $ref from one step's output into the next.
    job_yaml = tmp_path / "job.yaml"
    job_yaml.write_text(
        yaml.safe_dump(
            {
                "name": "ref chain",
                "steps": [
                    {"id": "up", "plugin": "text", "action": "transform", "args": {"text": "x y", "op": "upper"}},
                    {
                        "id": "rev",
                        "plugin": "text",
                        "action": "transform",
                        "args": {"text": {"$ref": "steps.up.output.text"}, "op": "reverse_words"},
                    },
                ],
            }
        )
    )
    chained = run_cli("submit", str(job_yaml), "--priority", "interactive", "--wait", *auth)
    assert chained.returncode == 0, chained.stdout + chained.stderr
    assert json.loads(chained.stdout[chained.stdout.index("{") :])["rev"]["text"] == "Y X"

    status = run_cli("status", job_id, *auth)
    assert status.returncode == 0, status.stderr
    assert "count" in status.stdout and "shout" in status.stdout and "succeeded" in status.stdout
    as_json = run_cli("status", job_id, "--json", *auth)
    assert json.loads(as_json.stdout)["state"] == "succeeded"

    # Without --url/--token the CLI finds this cluster through the files `up` wrote.
    listed = run_cli("jobs", env=cli_env(EDGEFLEET_DATA_DIR=str(up.data_dir)))
    assert listed.returncode == 0, listed.stderr
    assert job_id in listed.stdout
    for command in (["workers"], ["plugins"], ["jobs", "--state", "succeeded", "--limit", "5"]):
        result = run_cli(*command, *auth)
        assert result.returncode == 0, (command, result.stderr)
    nodes = json.loads(run_cli("workers", "--json", *auth).stdout)
    assert [n["name"] for n in nodes] == ["cli-test-node"]
    assert "cli-test-node" in run_cli("workers", *auth).stdout
    assert nodes[0]["express_slots"] == {"cpu": 1, "io": 1}

    # The client library: events of a finished job replay to its terminal event.
    with Client(up.url, token) as client:
        events = list(client.events(job_id))
    assert events[-1]["type"] == "job" and events[-1]["state"] == "succeeded"

    # Bad input: exit 2, one line naming the field, nothing on stdout.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"steps": [{"id": "a", "plugin": "no_such_plugin", "action": "x"}]}))
    refused = run_cli("submit", str(bad), *auth)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: steps.0.plugin: unknown plugin 'no_such_plugin'"), lines
    local_error = run_cli("submit", "--template", "text-report", "--input", "no-equals-sign", *auth)
    assert local_error.returncode == 2
    assert local_error.stderr.strip().splitlines() == [
        "error: --input: expected key=value or key:=<json>, got 'no-equals-sign'"
    ]
    missing = run_cli("status", "0" * 32, *auth)
    assert missing.returncode == 2 and missing.stderr.startswith("error: job_id:")
    unreachable = run_cli("jobs", "--url", f"http://127.0.0.1:{free_port()}", "--token", token)
    assert unreachable.returncode == 3
    assert len(unreachable.stderr.strip().splitlines()) == 1 and "is the router running?" in unreachable.stderr

    # Ctrl-C: exit 0 within 30 s, and no process of this cluster is left.
    children = up.record_children()
    names = " ".join(" ".join(p.cmdline()) for p in children)
    assert "redis-server" in names and "edgefleet router" in names and "edgefleet worker" in names
    assert "edgefleet.workers.class_worker" in names
    groups = {os.getpgid(p.pid) for p in children} | {up.proc.pid}
    assert up.interrupt(timeout=30) == 0, up.output()
    wait_until(lambda: not any(_alive(p) for p in children), 5, what="children to be gone")
    assert _processes_in_groups(groups) == []
    assert "stopped" in up.output()

    # Started again on the same data dir: same token, and the job survived (append-only file).
    again = up_factory(up.data_dir)
    assert again.token == token
    kept = run_cli("status", job_id, "--json", "--url", again.url, "--token", token)
    assert kept.returncode == 0, kept.stderr
    assert json.loads(kept.stdout)["subtasks"][1]["output"]["text"] == "A B A"
    again.record_children()
    assert again.interrupt(timeout=30) == 0


def _json(url: str, **params: str) -> object:
    try:
        response = httpx.get(url, params=params, timeout=10)
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


@pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the `prometheus` binary is not installed (apt-get install prometheus; .ci/run does)",
)
@pytest.mark.skipif(
    importlib.util.find_spec("flower") is None, reason="flower is not installed (pip install 'edgefleet[flower]')"
)
def test_up_with_prometheus_and_flower(up_factory: callable) -> None:
    prom_port, flower_port = free_port(), free_port()
    prom, flower = f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{flower_port}"
    up = up_factory(
        extra_args=(
            "--with-prometheus",
            "--prometheus-port",
            str(prom_port),
            "--with-flower",
            "--flower-port",
            str(flower_port),
        )
    )
    assert prom in up.output() and flower in up.output()  # the summary names both
    nodes = httpx.get(f"{up.url}/v1/workers", headers={"Authorization": f"Bearer {up.token}"}, timeout=10).json()
    assert [n["name"] for n in nodes] == ["cli-test-node"] and nodes[0]["metrics_url"]
    worker_target = nodes[0]["metrics_url"].split("//", 1)[1].split("/", 1)[0]

    # Prometheus scrapes the router (with the token `up` wrote for it) and the worker node.
    def targets_up() -> dict[str, dict[str, object]] | None:
        body = _json(f"{prom}/api/v1/targets")
        if not isinstance(body, dict):
            return None
        by_job = {t["labels"]["job"]: t for t in body["data"]["activeTargets"]}
        wanted = ("edgefleet-router", "edgefleet-workers")
        return by_job if all(by_job.get(job, {}).get("health") == "up" for job in wanted) else None

    try:
        by_job = wait_until(targets_up, 45, interval=0.5, what="Prometheus: router and worker targets up")
    except AssertionError:
        raise AssertionError(f"targets: {_json(f'{prom}/api/v1/targets')}\n{up.logs()}") from None
    assert by_job["edgefleet-router"]["labels"]["instance"] == f"127.0.0.1:{up.port}"
    assert by_job["edgefleet-workers"]["labels"]["instance"] == worker_target
    assert "flower" in by_job  # Flower's own /metrics is a target too

    # Flower's API (open on 127.0.0.1) lists the node's class workers.
    expected = {f"{rc}@cli-test-node" for rc in nodes[0]["classes"]}

    def flower_workers() -> set[str] | None:
        found = _json(f"{flower}/api/workers", refresh="1")
        return set(found) if isinstance(found, dict) and expected <= set(found) else None

    try:
        wait_until(flower_workers, 45, interval=0.5, what="Flower's worker list")
    except AssertionError:
        raise AssertionError(f"flower: {_json(f'{flower}/api/workers')}\n{up.logs()}") from None

    # Ctrl-C: every child, Prometheus and Flower included, is gone.
    children = up.record_children()
    names = " ".join(" ".join(p.cmdline()) for p in children)
    for part in ("redis-server", "edgefleet router", "edgefleet worker", "prometheus --config.file", " flower "):
        assert part in names, (part, names)
    groups = {os.getpgid(p.pid) for p in children} | {up.proc.pid}
    assert up.interrupt(timeout=30) == 0, up.output()
    wait_until(lambda: not any(_alive(p) for p in children), 10, what="children to be gone")
    assert _processes_in_groups(groups) == []
    out = up.output()
    assert re.search(r"prometheus\s+stopped", out) and re.search(r"flower\s+stopped", out), out


def test_help_for_every_command() -> None:
    top = run_cli("--help")
    assert top.returncode == 0
    for command in SUBCOMMANDS:
        assert command.split()[0] in top.stdout
    for command in SUBCOMMANDS:
        result = run_cli(*command.split(), "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert "Usage" in result.stdout
    up_help = run_cli("up", "--help", env=cli_env(COLUMNS="200")).stdout
    for option in ("--with-prometheus", "--prometheus-port", "--with-flower", "--flower-port"):
        assert option in up_help, option


def test_submit_without_a_body_is_refused_in_one_line() -> None:
    result = run_cli("submit", "--url", "http://127.0.0.1:9", "--token", "x")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[0].startswith("error: FILE:")
    assert len(result.stderr.strip().splitlines()) == 1


def test_api_error_is_one_line() -> None:
    err = ApiError(422, "invalid_plan", [{"field": "steps.0.plugin", "reason": "unknown plugin 'x'"}])
    assert str(err) == "422 invalid_plan: steps.0.plugin: unknown plugin 'x'"
    many = ApiError(422, "invalid_request", [{"field": "a", "reason": "bad\nthing"}, {"field": "", "reason": "r"}])
    assert str(many) == "422 invalid_request: a: bad thing; r"


def test_sse_parser() -> None:
    lines = [
        ": ping",
        "",
        "id: 1-0",
        "event: subtask",
        'data: {"type": "subtask", "subtask": "a", "state": "running"}',
        "",
        "event: job",
        'data: {"type": "job",',
        'data:  "state": "succeeded"}',
        "",
    ]
    events = list(_parse_sse(iter(lines)))
    assert events == [
        {"type": "subtask", "subtask": "a", "state": "running", "id": "1-0"},
        {"type": "job", "state": "succeeded"},
    ]


def test_embedded_redis_persists_across_restarts(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        client.set("kept", "yes")
        client.close()
    finally:
        first_pid = server.pid
        server.stop()
    assert first_pid is not None and not psutil.pid_exists(first_pid)
    again = EmbeddedRedis(tmp_path / "redis", port=server.port)
    again.start()
    try:
        client = redis.Redis.from_url(again.url)
        assert client.get("kept") == b"yes"
        client.close()
    finally:
        again.stop()


def test_compose_file_wires_one_redis_for_router_and_workers() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "router", "worker", "flower", "prometheus"} <= set(services)

    def env_of(name: str) -> dict[str, str]:
        env = services[name].get("environment", {})
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        return env

    url = env_of("router")["EDGEFLEET_REDIS_URL"]
    # Redis has a password, from .env, in the URL (the environment), never on a command line.
    assert url.startswith("redis://:${EDGEFLEET_REDIS_PASSWORD:?") and url.endswith("@redis:6379/0")
    assert "EDGEFLEET_REDIS_PASSWORD" in services["redis"]["environment"]["REDIS_PASSWORD"]
    assert "requirepass" in " ".join(map(str, services["redis"]["command"]))
    assert env_of("worker")["EDGEFLEET_REDIS_URL"] == url
    assert "appendonly" in " ".join(map(str, services["redis"].get("command", [])))
    assert "redis" in services["router"].get("depends_on", [])
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert "router:8700" in jobs["edgefleet-router"]["static_configs"][0]["targets"]
    assert "credentials_file" in jobs["edgefleet-router"]["authorization"]
