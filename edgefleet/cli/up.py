"""`edgefleet up`: the whole cluster on one box, with nothing installed but Python.

Starts, in this order, each as a child process in its own process group (so a
Ctrl-C in the terminal reaches only this supervisor, which then stops them in
order):

1. an embedded redis-server (when no Redis URL is configured), data in `<data_dir>/redis`;
2. the router (`python -m edgefleet router`), awaited on /healthz;
3. one worker node (`python -m edgefleet worker`), awaited on its heartbeat;
4. with `--with-prometheus`, a Prometheus server (the `prometheus` binary, e.g. the
   Debian package) scraping the router and every live node (found through the router's
   HTTP service discovery, so boxes that join later too), storage in `<data_dir>/prometheus`,
   evaluating edgefleet's alert rules; the router's feedback loop reads it;
5. with `--with-flower`, Flower (`python -m celery -A edgefleet.flower_app flower`) on
   127.0.0.1, its API open without auth there; workers then send task events.

Prometheus and Flower are side services: a missing binary or extra is one line and `up` runs
without it; one that exits is reported and restarted with a growing delay (RestartBackoff),
and never stops the router, the worker or Redis (the router's feedback loop reads Redis while
Prometheus is away).

With `--listen <address>` the router and the embedded Redis listen there; beyond loopback
Redis gets a password (made once, `<data_dir>/redis-password`, mode 0600), given to
redis-server on its stdin and to the children inside EDGEFLEET_REDIS_URL, in their
environment: no password on any command line.

On SIGINT/SIGTERM it stops the worker first (a warm shutdown: running subtasks
finish), then the router, then Redis, and sweeps each child's process group so
that nothing is left behind. A second Ctrl-C skips the wait for running subtasks.
Every child also gets SIGTERM from the kernel should this supervisor die
(PR_SET_PDEATHSIG on Linux).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgefleet.cli.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from edgefleet.cli.extras import install_hint, module_available
from edgefleet.cli.processes import (
    Child,
    RestartBackoff,
    popen_kwargs,
    port_in_use,
    project_root,
    spawn,
    sweep_group,
    write_secret_file,
)
from edgefleet.cli.side_services import (
    flower_command,
    free_local_port,
    prometheus_command,
    write_prometheus_files,
)
from edgefleet.client import ROUTER_URL_FILE, TOKEN_FILE, ApiError, Client, ClientError, read_token_file
from edgefleet.netguard import is_loopback_host
from edgefleet.schemas import JobStatus, ResourceClass
from edgefleet.settings import Scope, Settings

ROUTER_START_TIMEOUT = 60.0
NODE_START_TIMEOUT = 90.0
ROUTER_STOP_TIMEOUT = 20.0
DEMO_TEMPLATE = "text-report"
DEMO_TEXT = "edgefleet turns a few boxes into one cluster: one router, many workers, one cluster"


class StartError(RuntimeError):
    pass


class Interrupted(Exception):
    pass


@dataclass
class UpOptions:
    port: int | None = None
    data_dir: Path | None = None
    redis_url: str | None = None
    classes: list[ResourceClass] | None = None
    demo: bool = False
    worker_stop_timeout: float = 120.0
    with_prometheus: bool = False
    prometheus_port: int | None = None
    with_flower: bool = False
    flower_port: int | None = None
    # Where the embedded Redis and the router listen (default: the router_host setting, 127.0.0.1);
    # beyond loopback Redis gets a password (REDIS_PASSWORD_FILE).
    listen: str | None = None


REDIS_PASSWORD_FILE = "redis-password"


def redacted(url: str) -> str:
    """A Redis URL fit to print: its password replaced."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, f"{parts.username or ''}:***@{host}", parts.path, parts.query, parts.fragment))


@dataclass
class SideService:
    """Prometheus or Flower: started by `spawn`, restarted with `backoff` whenever it exits."""

    name: str
    spawn: Callable[[], Child]
    ready_url: str
    child: Child | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    restarts: int = 0
    backoff: RestartBackoff = field(default_factory=RestartBackoff)


@dataclass
class LocalCluster:
    """Supervises redis (optional), router and one worker node for `edgefleet up`."""

    settings: Settings
    options: UpOptions
    console: Console = field(default_factory=Console)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.options.data_dir or self.settings.data_dir).expanduser().resolve()
        self.host = self.options.listen or self.settings.router_host
        self.port = self.options.port or self.settings.router_port
        self.url = f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '::', '') else self.host}:{self.port}"
        self.redis: EmbeddedRedis | None = None
        self.redis_url: str = ""
        self.router: Child | None = None
        self.worker: Child | None = None
        self.side: dict[str, SideService] = {}
        self.prometheus_url: str | None = None
        self.flower_url: str | None = None
        self.token: str | None = None
        self.token_file: Path | None = None
        self.tokens_env: str | None = None
        self._stop = threading.Event()
        self._force = threading.Event()
        self._signals = 0

    # --- signals ------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        # SIGHUP too: a closed terminal stops the cluster in order rather than by PDEATHSIG.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals += 1
        if self._signals == 1:
            self._stop.set()
        else:
            self._force.set()

    @property
    def prometheus(self) -> Child | None:
        service = self.side.get("prometheus")
        return service.child if service else None

    @property
    def flower(self) -> Child | None:
        service = self.side.get("flower")
        return service.child if service else None

    def _interruptible_sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise Interrupted()

    # --- the whole run ------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, serve until a signal, stop everything. Returns the exit code."""
        self.install_signal_handlers()
        code = 0
        try:
            self.start()
            self.print_summary()
            if self.options.demo:
                self.run_demo()
            if not self._stop.is_set():
                self.console.print("[dim]Ctrl-C stops the cluster.[/dim]")
            code = self.supervise()
        except Interrupted:
            code = 0
        except (StartError, EmbeddedRedisError) as exc:
            self.console.file.flush()
            sys.stderr.write(f"error: {exc}\n")
            sys.stderr.flush()
            code = 1
        finally:
            self.stop()
        return code

    # --- start --------------------------------------------------------------------------

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(self.data_dir, 0o700)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        if port_in_use(self.host, self.port):
            raise StartError(
                f"port {self.port} on {self.host} is in use (is another `edgefleet up` running?); "
                "choose another with --port"
            )
        self._setup_tokens()
        self._plan_extras()
        self._start_redis()
        self._start_router()
        self._start_worker()
        if self.options.with_flower:
            self._start_flower()
        if self.options.with_prometheus:
            self._start_prometheus()

    # --- Prometheus and Flower ------------------------------------------------------------

    def _plan_extras(self) -> None:
        """Ports chosen before the router starts, so that it knows where Prometheus will be."""
        import shutil

        if self.options.with_prometheus:
            if shutil.which("prometheus") is None:
                self._warn(
                    "prometheus binary not found on PATH (e.g. `apt-get install prometheus`): not starting "
                    "Prometheus; the feedback loop reads Redis instead"
                )
                self.options.with_prometheus = False
            else:
                port = self.options.prometheus_port or free_local_port()
                self.prometheus_url = f"http://127.0.0.1:{port}"
        if self.options.with_flower:
            if not module_available("flower"):
                self._warn(f"flower is not installed ({install_hint('flower')}): not starting Flower")
                self.options.with_flower = False  # and the workers send no task events
            else:
                port = self.options.flower_port or free_local_port()
                self.flower_url = f"http://127.0.0.1:{port}"

    def _spawn_cmd(self, name: str, cmd: list[str], env: dict[str, str]) -> Child:
        return spawn(name, cmd, env, cwd=self.data_dir, log_dir=self.data_dir / "logs")

    def _await_http(self, child: Child, url: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as http:
            while True:
                self._check_alive(child)
                try:
                    if http.get(url).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise StartError(f"{child.name} not ready after {timeout:g}s: {child.log_tail()}")
                self._interruptible_sleep(0.2)

    def _start_flower(self) -> None:
        assert self.flower_url is not None
        env = self._child_env()
        env["FLOWER_UNAUTHENTICATED_API"] = "true"  # bound to 127.0.0.1 only
        cmd = flower_command(self.flower_url)
        self._start_side(
            SideService("flower", lambda: self._spawn_cmd("flower", cmd, env), f"{self.flower_url}/healthcheck"),
            self.flower_url,
        )

    def _start_prometheus(self) -> None:
        assert self.prometheus_url is not None
        prom_dir = self.data_dir / "prometheus"
        # No static node targets: Prometheus asks the router for the live nodes (HTTP SD).
        config = write_prometheus_files(
            prom_dir,
            self.url,
            self.token,
            [],
            self.flower_url,
            interactive_p95_objective=self.settings.interactive_p95_objective,
        )
        cmd = prometheus_command(config, prom_dir, self.prometheus_url)
        env = dict(os.environ)
        self._start_side(
            SideService(
                "prometheus", lambda: self._spawn_cmd("prometheus", cmd, env), f"{self.prometheus_url}/-/ready"
            ),
            f"{self.prometheus_url}, config {config}",
            timeout=60.0,
        )

    def _start_side(self, service: SideService, where: str, timeout: float = 30.0) -> None:
        """Start a side service and wait until it answers; one that fails is tended by `supervise`."""
        self.side[service.name] = service
        child = service.child = service.spawn()
        service.started_at = time.monotonic()
        try:
            self._await_http(child, service.ready_url, timeout=timeout)
        except StartError:
            if child.alive():
                self._warn(
                    f"{service.name} not ready after {timeout:g}s; running on without waiting ({child.log_path})"
                )
            else:
                self._side_exited(service)
            return
        self._say(service.name, f"{where} (pid {child.pid})")

    def _tend_side(self, service: SideService) -> None:
        """Notice a side service that exited; start it again once its back-off delay has passed."""
        if service.child is not None:
            if not service.child.alive():
                self._side_exited(service)
            return
        if service.restart_at is not None and time.monotonic() >= service.restart_at:
            service.child = service.spawn()
            service.started_at = time.monotonic()
            service.restart_at = None
            service.restarts += 1
            self._say(service.name, f"restarted (pid {service.child.pid}, restart {service.restarts})")

    def _side_exited(self, service: SideService) -> None:
        child = service.child
        assert child is not None
        code = child.proc.returncode
        self._release(child)
        service.child = None
        delay = service.backoff.delay_after(time.monotonic() - service.started_at)
        service.restart_at = time.monotonic() + delay
        self._warn(
            f"{service.name} exited with code {code}; restarting it in {delay:g}s (the cluster runs on). "
            f"Last log lines ({child.log_path}):"
        )
        self.console.print(escape(child.log_tail(600)), highlight=False, soft_wrap=True)

    def _setup_tokens(self) -> None:
        if self.settings.tokens:
            # Tokens come from the configuration; children inherit it. Use one for our own calls.
            if self.settings.token is not None:
                self.token = self.settings.token.get_secret_value()
            else:
                for token, grant in self.settings.tokens.items():
                    if Scope.admin in grant.scopes or {Scope.read, Scope.submit} <= set(grant.scopes):
                        self.token = token
                        break
            return
        self.token_file = self.data_dir / TOKEN_FILE
        existing = read_token_file(self.data_dir)
        token = existing if existing is not None else secrets.token_urlsafe(32)
        write_secret_file(self.token_file, token)  # (re)asserts mode 0600
        self.token = token
        self.tokens_env = json.dumps({token: {"scopes": ["admin"], "tenant": "default"}})

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "EDGEFLEET_REDIS_URL": self.redis_url,
                "EDGEFLEET_ROUTER_HOST": self.host,
                "EDGEFLEET_ROUTER_PORT": str(self.port),
                "EDGEFLEET_ROUTER_URL": self.url,
                "EDGEFLEET_DATA_DIR": str(self.data_dir),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.redis is not None:
            env.pop("EDGEFLEET_BROKER_URL", None)  # the embedded Redis is the broker too
        if self.tokens_env is not None:
            env["EDGEFLEET_TOKENS"] = self.tokens_env
        if self.prometheus_url:
            env["EDGEFLEET_PROMETHEUS_URL"] = self.prometheus_url
        if self.options.with_flower:
            env["EDGEFLEET_TASK_EVENTS"] = "true"
        if "EDGEFLEET_WORKER_METRICS_PORT" not in os.environ:
            wanted = self.port + 1
            port = wanted if wanted < 65536 and not port_in_use(self.settings.worker_metrics_host, wanted) else 0
            env["EDGEFLEET_WORKER_METRICS_PORT"] = str(port)
        root = project_root()
        if root is not None:
            parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            if str(root) not in parts:
                env["PYTHONPATH"] = os.pathsep.join([str(root), *parts])
        return env

    def _start_redis(self) -> None:
        configured = self.options.redis_url or (
            self.settings.redis_url if "redis_url" in self.settings.model_fields_set else None
        )
        if configured:
            self.redis_url = configured
            self._say("redis", f"using {redacted(configured)}")
            return
        self.redis = EmbeddedRedis(
            self.data_dir / "redis",
            host=self.host if self.options.listen else "127.0.0.1",
            popen_kwargs=popen_kwargs(),
            password=self._redis_password(),
        )
        self.redis.start(should_stop=self._stop.is_set)
        if self._stop.is_set():
            raise Interrupted()
        self.redis_url = self.redis.url
        where = f"listening on {self.redis.host}:{self.redis.port}, " if self.options.listen else ""
        self._say(
            "redis",
            f"{redacted(self.redis_url)} ({where}pid {self.redis.pid}, append-only file in {self.redis.data_dir})",
        )

    def _redis_password(self) -> str | None:
        """Beyond loopback the embedded Redis needs a password: made once, kept 0600 in the data dir.
        Children get it inside EDGEFLEET_REDIS_URL (their environment), never on a command line."""
        if not self.options.listen or is_loopback_host(self.options.listen):
            return None
        path = self.data_dir / REDIS_PASSWORD_FILE
        try:
            password = path.read_text().strip()
        except OSError:
            password = ""
        password = password or secrets.token_hex(32)
        write_secret_file(path, password)  # (re)asserts mode 0600
        return password

    def _spawn(self, name: str, args: list[str]) -> Child:
        return self._spawn_cmd(name, [sys.executable, "-m", "edgefleet", *args], self._child_env())

    def _start_router(self) -> None:
        # The Redis URL reaches children through EDGEFLEET_REDIS_URL (_child_env): it may hold a password.
        self.router = self._spawn("router", ["router", "--port", str(self.port)])
        deadline = time.monotonic() + ROUTER_START_TIMEOUT
        with httpx.Client(timeout=2.0) as http:
            while True:
                self._check_alive(self.router)
                try:
                    if http.get(f"{self.url}/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise StartError(f"router not healthy after {ROUTER_START_TIMEOUT:g}s: {self.router.log_tail()}")
                self._interruptible_sleep(0.1)
        with contextlib.suppress(OSError):
            write_secret_file(self.data_dir / ROUTER_URL_FILE, self.url)
        self._say("router", f"{self.url} (pid {self.router.pid})")

    def _start_worker(self) -> None:
        args = ["worker", "--node-name", self.settings.node_name]
        if self.options.classes:
            args += ["--classes", ",".join(c.value for c in self.options.classes)]
        self.worker = self._spawn("worker", args)
        deadline = time.monotonic() + NODE_START_TIMEOUT
        while True:
            self._check_alive(self.worker)
            if self._node_seen():
                break
            if time.monotonic() > deadline:
                raise StartError(
                    f"worker node sent no heartbeat within {NODE_START_TIMEOUT:g}s: {self.worker.log_tail()}"
                )
            self._interruptible_sleep(0.2)
        self._say("worker", f"node {self.settings.node_name!r} (pid {self.worker.pid})")

    def _node_seen(self) -> bool:
        if self.token:
            try:
                with self.client(timeout=5.0) as client:
                    return any(n.name == self.settings.node_name for n in client.workers())
            except ClientError:
                return False
        from edgefleet.store import JobStore

        store = JobStore.from_url(self.redis_url, self.settings.key_prefix)
        try:
            return any(n.name == self.settings.node_name for n in store.nodes.live_nodes())
        except Exception:
            return False
        finally:
            store.close()

    def _check_alive(self, child: Child) -> None:
        if not child.alive():
            raise StartError(f"{child.name} exited with code {child.proc.returncode}:\n{child.log_tail()}")

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.url, self.token, timeout=timeout)

    # --- report -------------------------------------------------------------------------

    def _warn(self, text: str) -> None:
        # soft_wrap: one line however narrow the terminal (or 80 columns when piped).
        self.console.print(f"[yellow]![/yellow] {escape(text)}", highlight=False, soft_wrap=True)

    def _say(self, what: str, text: str) -> None:
        self.console.print(f"[green]✓[/green] [bold]{what:<7}[/bold] {escape(text)}", highlight=False)

    def print_summary(self) -> None:
        metrics = [f"{self.url}/metrics (router; bearer token needed)"]
        try:
            with self.client(timeout=5.0) as client:
                for node in client.workers():
                    if node.metrics_url:
                        metrics.append(f"{node.metrics_url} (worker node {node.name})")
        except ClientError:
            pass
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        table.add_row("router", escape(self.url))
        table.add_row("API docs", escape(f"{self.url}/docs"))
        table.add_row("metrics", escape("\n".join(metrics)))
        redis_note = "  (embedded)" if self.redis else ""
        if self.redis is not None and self.redis.password:
            redis_note += f"  password in {self.data_dir / REDIS_PASSWORD_FILE} (mode 0600)"
        table.add_row("redis", escape(redacted(self.redis_url) + redis_note))
        if self.prometheus_url and self.prometheus is not None:
            table.add_row("prometheus", escape(self.prometheus_url))
        if self.flower_url and self.flower is not None:
            table.add_row("flower", escape(self.flower_url))
        table.add_row("data dir", escape(str(self.data_dir)))
        table.add_row("logs", escape(str(self.data_dir / "logs")))
        if self.token_file is not None:
            table.add_row("token file", escape(f"{self.token_file}  (mode 0600; the CLI on this box reads it)"))
            table.add_row("token", escape(self.token or ""))
        else:
            table.add_row("tokens", "from your configuration (EDGEFLEET_TOKENS)")
        self.console.print()
        self.console.print("[bold green]edgefleet is up[/bold green]")
        self.console.print(table)
        self.console.print()
        self.console.print(
            "Try: [bold]edgefleet submit --demo --wait[/bold]   "
            "[dim](or `edgefleet workers`, `edgefleet plugins`, `edgefleet jobs`)[/dim]",
            highlight=False,
        )
        default_dir = Path(self.settings.data_dir).expanduser().resolve()
        if self.data_dir != default_dir:
            self.console.print(
                f"[dim]From another shell: export EDGEFLEET_DATA_DIR={self.data_dir} "
                f"(or pass --url {self.url} --token ...)[/dim]",
                highlight=False,
            )

    # --- demo ---------------------------------------------------------------------------

    def run_demo(self) -> None:
        self.console.print(f"\n[bold]demo:[/bold] submitting the {DEMO_TEMPLATE!r} template job")
        body = {"template": DEMO_TEMPLATE, "inputs": {"text": DEMO_TEXT}, "name": "demo", "priority": "interactive"}
        try:
            with self.client() as client:
                job = client.submit(body)
                self.console.print(f"  job {job.id}", highlight=False)
                deadline = time.monotonic() + 120
                while not job.state.terminal:
                    if self._stop.is_set():
                        return
                    if time.monotonic() > deadline:
                        self.console.print(
                            f"[yellow]  demo job still running after 120 s; see `edgefleet status {job.id}`[/yellow]"
                        )
                        return
                    time.sleep(0.2)
                    job = client.get(job.id)
        except (ApiError, ClientError) as exc:
            self.console.print(f"[red]  demo failed:[/red] {escape(str(exc))}")
            return
        self._print_job_result(job)

    def _print_job_result(self, job: JobStatus) -> None:
        colour = "green" if job.state.value == "succeeded" else "red"
        self.console.print(f"  state: [{colour}]{job.state.value}[/{colour}]")
        for st in job.subtasks:
            value = st.output if st.error is None else {"error": st.error}
            text = json.dumps(value, default=str)
            text = text if len(text) <= 300 else text[:297] + "..."
            self.console.print(f"  [bold]{escape(st.id)}[/bold] → {escape(text)}", highlight=False)

    # --- run and stop -------------------------------------------------------------------

    def supervise(self) -> int:
        """Wait for a signal; the worker, the router or Redis dying on its own ends the run with code 1;
        a side service that exits is restarted (`_tend_side`)."""
        while not self._stop.wait(0.5):
            for service in self.side.values():
                self._tend_side(service)
            for child in (self.worker, self.router):
                if child is not None and not child.alive():
                    self.console.print(
                        f"[red]error:[/red] {child.name} exited with code {child.proc.returncode}; "
                        f"stopping. Last log lines ({child.log_path}):\n{escape(child.log_tail())}",
                        highlight=False,
                    )
                    return 1
            if self.redis is not None and not self.redis.running():
                self.console.print(f"[red]error:[/red] redis-server exited; stopping.\n{escape(self.redis.log_tail())}")
                return 1
        return 0

    def stop(self) -> None:
        """Workers first (warm shutdown), then the router, then Redis. Idempotent."""
        parts = [
            name
            for name, part in (
                ("prometheus", self.prometheus),
                ("flower", self.flower),
                ("worker", self.worker),
                ("router", self.router),
                ("redis", self.redis),
            )
            if part is not None
        ]
        if parts:
            self.console.print(f"\n[bold]stopping[/bold] ({', '.join(parts)})…")
        for service in self.side.values():
            service.restart_at = None  # no restart while stopping
            if service.child is not None:
                self._stop_child(service.child, ROUTER_STOP_TIMEOUT)
                service.child = None
        if self.worker is not None:
            self._stop_child(
                self.worker,
                self.options.worker_stop_timeout,
                waiting_note="waiting for running subtasks to finish (Ctrl-C again to stop at once)",
            )
            self.worker = None
        if self.router is not None:
            self._stop_child(self.router, ROUTER_STOP_TIMEOUT)
            self.router = None
            url_file = self.data_dir / ROUTER_URL_FILE
            with contextlib.suppress(OSError):
                if url_file.read_text().strip() == self.url:
                    url_file.unlink()
        if self.redis is not None:
            pid = self.redis.pid
            self.redis.stop()
            if pid is not None:
                sweep_group(pid)
            self._say("redis", "stopped")
            self.redis = None

    def _stop_child(self, child: Child, timeout: float, waiting_note: str = "") -> None:
        if child.alive():
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            noted = False
            while child.alive():
                if self._force.is_set() or time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(child.pid, signal.SIGKILL)
                    child.proc.kill()
                    break
                if not noted and waiting_note and time.monotonic() > deadline - timeout + 3:
                    self.console.print(f"[dim]{child.name}: {waiting_note}[/dim]")
                    noted = True
                time.sleep(0.05)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(10)
        self._release(child)
        code = child.proc.returncode
        clean = code in (0, -signal.SIGTERM, -signal.SIGINT)
        self._say(child.name, "stopped" if clean else f"stopped (exit code {code})")

    @staticmethod
    def _release(child: Child) -> None:
        """After a child exited: what is left of its process group goes, its log file is closed."""
        sweep_group(child.pid)
        if child.log_file is not None:
            child.log_file.close()
            child.log_file = None


def run_up(settings: Settings, options: UpOptions, console: Console | None = None) -> int:
    cluster = LocalCluster(settings=settings, options=options, console=console or Console())
    return cluster.run()
