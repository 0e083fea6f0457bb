"""The client commands on jobs and nodes: submit, status, jobs, cancel, gc, workers (with their tables).

Exit codes: 0 ok; 1 the job failed or was cancelled (`submit --wait`, `status --wait`);
2 bad input; 3 the router is unreachable or failed."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgefleet.cli.artifacts import upload_inputs
from edgefleet.cli.common import TokenOption, UrlOption, api_errors, err_console, fail, make_client, out_console
from edgefleet.cli.job_input import parse_inputs, read_batch, read_body
from edgefleet.schemas import JobState, NodeInfo, PriorityClass

if TYPE_CHECKING:
    from edgefleet.client import BatchItem, Client
    from edgefleet.schemas import JobStatus

DEMO_TEXT = "the quick brown fox jumps over the lazy dog and the dog sleeps"


def _finished_count(status: JobStatus) -> int:
    return sum(1 for st in status.subtasks if st.state.value in ("succeeded", "failed", "cancelled"))


def _watch(client: Client, job_id: str, timeout: float | None) -> JobStatus:
    """Wait for the job with a progress bar (subtasks finished / total) on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = err_console()
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
            progress.update(
                task, total=len(status.subtasks), completed=_finished_count(status), description=description
            )

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


def submit(
    file: Annotated[
        str | None,
        typer.Argument(
            metavar="[FILE|-]", help="job body, JSON or YAML (steps or template); '-' reads stdin", show_default=False
        ),
    ] = None,
    template: Annotated[
        str | None, typer.Option("--template", "-t", help="run this workflow template", show_default=False)
    ] = None,
    inputs: Annotated[
        list[str] | None,
        typer.Option(
            "--input",
            "-i",
            help="template input: key=value (a string), key:=<JSON>, or key=@<file or folder> (uploaded); repeatable",
            show_default=False,
        ),
    ] = None,
    priority: Annotated[
        PriorityClass | None, typer.Option(help="interactive, normal or batch (default: normal)", show_default=False)
    ] = None,
    name: Annotated[str | None, typer.Option(help="a name for the job", show_default=False)] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="resubmitting with the same key returns the same job", show_default=False)
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="show progress until the job ends, print outputs")] = False,
    timeout: Annotated[
        float | None, typer.Option(help="with --wait: give up after this many seconds", show_default=False)
    ] = None,
    demo: Annotated[bool, typer.Option("--demo", help="submit a small demo job (template text-report)")] = False,
    batch: Annotated[
        str | None,
        typer.Option(
            "--batch",
            metavar="FILE.jsonl",
            help="submit many jobs: one JSON job body per line (each may have an 'idempotency_key'); "
            "'-' reads stdin; prints one job id per line",
            show_default=False,
        ),
    ] = None,
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
        edgefleet submit --batch jobs.jsonl --priority batch
    """
    if batch is not None:
        others: dict[str, object] = {"FILE": file, "--template": template, "--input": inputs, "--name": name}
        others |= {"--idempotency-key": idempotency_key, "--wait": wait, "--demo": demo}
        if given_too := [option for option, value in others.items() if value]:
            fail("--batch", f"goes alone with --priority, --url and --token, not with {', '.join(given_too)}")
        _submit_batch(batch, priority, url, token)
        return
    given = [x for x in (file is not None, template is not None, demo) if x]
    if len(given) > 1:
        fail("FILE", "give only one of FILE, --template or --demo")
    if demo:
        body: dict[str, Any] = {"template": "text-report", "inputs": {"text": DEMO_TEXT}, "name": "demo"}
    elif template is not None:
        body = {"template": template}
    elif file is not None:
        body = read_body(file)
    else:
        fail("FILE", "give a job file ('-' for stdin), --template NAME or --demo; see `edgefleet submit --help`")
    extra_inputs = parse_inputs(inputs) if inputs else {}
    if priority is not None:
        body["priority"] = priority.value
    if name is not None:
        body["name"] = name
    with api_errors(), make_client(url, token) as client:
        if extra_inputs:
            earlier = body.get("inputs")
            merged: dict[str, Any] = earlier if isinstance(earlier, dict) else {}
            # `--input key=@path`: the file or folder is uploaded first, the input names the artifact.
            body["inputs"] = {**merged, **upload_inputs(client, extra_inputs)}
        job = client.submit(body, idempotency_key=idempotency_key)
        print(job.id, flush=True)
        if not wait:
            return
        final = _watch(client, job.id, timeout)
    print(json.dumps(_outputs(final), indent=2, default=str))
    _report_end(final)
    raise typer.Exit(_job_exit_code(final))


def _submit_batch(file: str, priority: PriorityClass | None, url: str | None, token: str | None) -> None:
    """`submit --batch`: the file's jobs in chunks of EDGEFLEET_BATCH_MAX_JOBS, a progress bar on
    stderr for more than one chunk; each accepted job's id on stdout (in file order), each refused
    line on stderr. Exit 2 when any line was refused (the others are submitted)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgefleet.cli.common import load_settings

    lines = read_batch(file)
    bodies = [body for _, body in lines]
    if priority is not None:
        for body in bodies:
            body.setdefault("priority", priority.value)
    chunk = load_settings().batch_max_jobs
    console = err_console()
    refused = 0

    def report(items: list[BatchItem]) -> None:
        # As each chunk is answered: a chunk refused later, or Ctrl-C, loses no id already made.
        nonlocal refused
        for item in items:
            if item.error is None:
                print(item.id, flush=True)
            else:
                refused += 1
                console.print(
                    f"{file}:{lines[item.index][0]}: {item.error}", markup=False, highlight=False, soft_wrap=True
                )

    with api_errors(), make_client(url, token) as client:
        if len(bodies) <= chunk:
            client.submit_many(bodies, chunk_size=chunk, on_items=report)
        else:
            with Progress(
                TextColumn("submitting"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=console.is_terminal,
            ) as progress:
                task = progress.add_task("jobs", total=len(bodies))
                client.submit_many(
                    bodies,
                    chunk_size=chunk,
                    on_items=report,
                    on_progress=lambda done, _: progress.update(task, completed=done),
                )
    if refused:
        sys.stderr.write(f"{refused} of {len(bodies)} jobs refused; the other {len(bodies) - refused} were submitted\n")
        raise typer.Exit(2)


def _clock(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "-"


def _duration(start: float | None, end: float | None) -> str:
    if not start:
        return "-"
    seconds = (end or time.time()) - start
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.1f}s"


STATE_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
    "running": "cyan",
    "queued": "blue",
    "ready": "blue",
    "retry_wait": "magenta",
    "waiting": "dim",
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
            # Why it went there (model steps): warm box, fastest box, or the class queue.
            escape(st.node or "-") + (f"\n[dim]{escape(st.placement)}[/dim]" if st.placement else ""),
            _clock(st.queued_at),
            _duration(st.queued_at, st.started_at) if st.started_at else "-",
            _duration(st.started_at, st.finished_at),
            escape((st.error or "")[:200]),
        )
    return table


def status(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="the job id")],
    wait: Annotated[bool, typer.Option("--wait", "-w", help="show progress until the job ends")] = False,
    timeout: Annotated[
        float | None, typer.Option(help="with --wait: give up after this many seconds", show_default=False)
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
    with api_errors(), make_client(url, token) as client:
        current = _watch(client, job_id, timeout) if wait else client.get(job_id)
    if as_json:
        print(current.model_dump_json(indent=2))
    else:
        out_console().print(_status_table(current))
    if wait:
        raise typer.Exit(_job_exit_code(current))


def jobs(
    state: Annotated[JobState | None, typer.Option(help="only jobs in this state", show_default=False)] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="at most this many")] = 50,
    cursor: Annotated[str | None, typer.Option(help="continue a previous listing", show_default=False)] = None,
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

    with api_errors(), make_client(url, token) as client:
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
            job.id,
            escape(job.name or "-"),
            f"[{style}]{job.state.value}[/]",
            job.priority.value,
            escape(job.tenant),
            _clock(job.created_at),
            _duration(job.created_at, job.finished_at) if job.finished_at else "-",
        )
    console = out_console()
    console.print(table)
    if page.next_cursor:
        console.print(f"more: edgefleet jobs --cursor {page.next_cursor}")


def cancel(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="the job id")],
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Cancel a job: queued subtasks are dropped, running ones are stopped.

    Example:

        edgefleet cancel 3f2c9a...
    """
    with api_errors(), make_client(url, token) as client:
        result = client.cancel(job_id)
    print(f"{result.id} {result.state.value}")


def _seconds(value: str) -> float:
    """`90`, `90s`, `15m`, `12h` or `7d` as seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = value.strip().lower()
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        fail("--older-than", f"{value!r}: a duration like 90, 90s, 15m, 12h or 7d")
    if not seconds >= 0 or seconds == float("inf"):
        fail("--older-than", f"{value!r}: must be zero or more")
    return seconds


def _gc_batch(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    """One `POST /v1/admin/gc`: a batch per call keeps each Lua script short, so Redis serves
    everyone else in between."""
    return client.gc(older_than=body.get("older_than"), limit=body.get("limit"))


def gc(
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than",
            help="delete jobs finished longer ago than this (90s, 15m, 12h, 7d); "
            "default: the router's retention (EDGEFLEET_JOB_RETENTION)",
            show_default=False,
        ),
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
    with api_errors(), make_client(url, token) as client:
        answer = _gc_batch(client, body)
        removed: list[str] = list(answer["removed"])
        age: float = answer["older_than"]
        if answer["removed"] and answer["remaining"] > 0:
            console = err_console()
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                console=console,
                transient=console.is_terminal,
            ) as progress:
                task = progress.add_task(
                    "deleting finished jobs", total=len(removed) + answer["remaining"], completed=len(removed)
                )
                while answer["removed"] and answer["remaining"] > 0:
                    answer = _gc_batch(client, body)
                    removed += answer["removed"]
                    progress.update(task, total=len(removed) + answer["remaining"], completed=len(removed))
    if as_json:
        print(json.dumps({"removed": removed, "older_than": age}, indent=2))
    else:
        print(f"removed {len(removed)} finished job(s) older than {age:g}s")


def workers(
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON")] = False,
    bench: Annotated[
        bool, typer.Option("--bench", help="ask every node to run its benchmark again (admin) and wait for it")
    ] = False,
    bench_timeout: Annotated[float, typer.Option(help="seconds --bench waits for the nodes")] = 300.0,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """List the live worker nodes: classes, cores, memory, load, benchmark, last heartbeat.

    Each node benchmarks itself at start: a single-core CPU score (higher is faster) and
    the tokens/s of each local model; the dispatcher sends model steps to the fastest box.
    `--bench` measures again (e.g. once a box is idle) and exits 1 if a node did not finish.

    Examples:

        edgefleet workers
        edgefleet workers --bench
    """
    with api_errors(), make_client(url, token) as client:
        pending: list[str] = []
        if bench:
            pending = _bench_and_wait(client, bench_timeout)
        nodes = client.workers()
    if as_json:
        print(json.dumps([n.model_dump(mode="json") for n in nodes], indent=2))
    else:
        _print_workers(nodes)
    if pending:
        err_console().print(f"benchmark not finished after {bench_timeout:g}s on: {', '.join(pending)}")
        raise typer.Exit(1)


def _bench_and_wait(client: Client, timeout: float) -> list[str]:
    """POST /v1/workers/bench, then poll until every node listed has answered; returns those that have not."""
    answer = client.bench_workers()
    request: int = answer["request"]
    asked = set(answer["nodes"])
    deadline = time.monotonic() + timeout
    console = err_console()
    with console.status(f"benchmarking {len(asked)} node(s)"):
        while True:
            # A node that left (stopped, heartbeat expired) is not waited for.
            pending = sorted(
                n.name for n in client.workers() if n.name in asked and (n.bench is None or n.bench.request < request)
            )
            if not pending or time.monotonic() > deadline:
                return pending
            time.sleep(0.5)


def _print_workers(nodes: list[NodeInfo]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="worker nodes")
    table.add_column("node", no_wrap=True)
    for column in (
        "classes",
        "cores",
        "memory free",
        "cpu",
        "gpus",
        "cpu score",
        "tokens/s",
        "plugins",
        "heartbeat",
        "metrics",
    ):
        table.add_column(column, overflow="fold")
    now = time.time()
    for node in nodes:
        table.add_row(
            escape(node.name),
            _classes_cell(node),
            str(node.cores),
            f"{node.memory_available / 2**30:.1f}/{node.memory_total / 2**30:.1f} GiB",
            f"{node.cpu_percent:.0f}%",
            escape(", ".join(node.gpus) or "-"),
            *_bench_cells(node),
            escape(", ".join(node.plugins)),
            f"{max(0.0, now - node.heartbeat_at):.1f}s ago",
            escape(node.metrics_url or "-"),
        )
    console = out_console()
    console.print(table)
    if not nodes:
        console.print("no live nodes: start one with `edgefleet worker --broker redis://...`")


def _bench_cells(node: NodeInfo) -> tuple[str, str]:
    """`41966`, `smollm2 37.2`: the benchmark's figures, or why there are none."""
    from rich.markup import escape

    bench = node.bench
    if bench is None:
        return ("measuring…" if node.bench_running else "-"), "-"
    score = f"{bench.cpu_score:.0f}" if bench.cpu_score is not None else "-"
    speeds = [f"{escape(name)} {tps:.1f}" for name, tps in sorted(bench.tokens_per_s.items())]
    speeds += [f"{escape(name)}: {escape(why)}" for name, why in sorted(bench.errors.items()) if name != "cpu"]
    if node.bench_running:
        score += " (measuring…)"
    return score, "\n".join(speeds) or "-"


def _classes_cell(node: NodeInfo) -> str:
    """`cpu (+1 express), io (+1 express), gpu`: the classes and their express slots."""
    cells = []
    for rc in node.classes:
        express = node.express_slots.get(rc.value, 0)
        cells.append(f"{rc.value} (+{express} express)" if express else rc.value)
    return ", ".join(cells)
