"""`edgefleet schedule add|list|show|pause|resume|rm`: jobs on a cron expression or an interval.

Exit codes as for the other client commands: 0 ok, 2 bad input, 3 router unreachable or failing."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgefleet.cli.artifacts import upload_inputs
from edgefleet.cli.common import TokenOption, UrlOption, api_errors, fail, make_client, out_console
from edgefleet.cli.job_input import parse_inputs, read_body
from edgefleet.schedule_schemas import MissedPolicy, OverlapPolicy
from edgefleet.schemas import PriorityClass

if TYPE_CHECKING:
    from edgefleet.schedule_schemas import ScheduleStatus

schedule_app = typer.Typer(
    help="Run jobs on a schedule: a cron expression or an interval.", no_args_is_help=True, add_completion=False
)

ScheduleArg = Annotated[str, typer.Argument(metavar="SCHEDULE", help="the schedule id")]
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(option: str, value: str) -> float:
    """`90`, `90s`, `15m`, `12h` or `7d` as seconds."""
    text = value.strip().lower()
    number, unit = (text[:-1], text[-1]) if text[-1:] in UNITS else (text, "s")
    try:
        seconds = float(number) * UNITS[unit]
    except ValueError:
        fail(option, f"{value!r}: a duration like 90, 90s, 15m, 12h or 7d")
    if not 0 <= seconds < float("inf"):
        fail(option, f"{value!r}: must be zero or more")
    return seconds


def _when(schedule: ScheduleStatus) -> str:
    if schedule.cron is not None:
        return f"cron {schedule.cron} ({schedule.timezone})"
    seconds = schedule.interval_s or 0.0
    for unit in ("d", "h", "m"):
        if seconds >= UNITS[unit] and seconds % UNITS[unit] == 0:
            return f"every {seconds / UNITS[unit]:g}{unit}"
    return f"every {seconds:g}s"


def _clock(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


@schedule_app.command("add")
def add(
    file: Annotated[
        str | None,
        typer.Argument(metavar="[FILE|-]", help="the job body, JSON or YAML (steps or template)", show_default=False),
    ] = None,
    template: Annotated[
        str | None, typer.Option("--template", "-t", help="run this workflow template", show_default=False)
    ] = None,
    inputs: Annotated[
        list[str] | None,
        typer.Option(
            "--input",
            "-i",
            help="template input: key=value, key:=<JSON>, or key=@<file or folder> (uploaded once); repeatable",
            show_default=False,
        ),
    ] = None,
    cron: Annotated[
        str | None,
        typer.Option(help="cron expression: minute hour day month weekday (a 6th field: seconds)", show_default=False),
    ] = None,
    every: Annotated[str | None, typer.Option(help="an interval: 90s, 15m, 1h, 1d", show_default=False)] = None,
    timezone: Annotated[str, typer.Option("--tz", help="IANA time zone the cron fields are read in")] = "UTC",
    jitter: Annotated[
        str | None, typer.Option(help="start each run up to this much later (e.g. 5m)", show_default=False)
    ] = None,
    overlap: Annotated[
        OverlapPolicy, typer.Option(help="skip: no new job while the previous one runs; allow: always")
    ] = OverlapPolicy.skip,
    missed: Annotated[
        MissedPolicy, typer.Option(help="fire times missed while the router was down: one job (run_once), or none")
    ] = MissedPolicy.run_once,
    grace: Annotated[
        str | None,
        typer.Option(help="how late a fire time may still run on its own (default 60s)", show_default=False),
    ] = None,
    name: Annotated[str | None, typer.Option(help="a name; its jobs are named <name>@<fire time>")] = None,
    priority: Annotated[
        PriorityClass | None, typer.Option(help="the jobs' priority class (default: normal)", show_default=False)
    ] = None,
    paused: Annotated[bool, typer.Option("--paused", help="create it paused")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Add a schedule; print its id and next fire times.

    Examples:

        edgefleet schedule add --template ci-pipeline -i repo=/srv/git/app --every 1h --name app-tests
        edgefleet schedule add --template knowledge-refresh -i index_dir=/srv/kb -i urls:='["https://example.org"]' --cron "0 3 * * *" --tz Europe/Berlin
        edgefleet schedule add job.yaml --cron "30 19 * * *" --jitter 5m --missed skip
    """
    if (file is None) == (template is None):
        fail("FILE", "give a job file ('-' for stdin) or --template NAME")
    if (cron is None) == (every is None):
        fail("--cron", "give exactly one of --cron or --every")
    job: dict[str, Any] = read_body(file) if file is not None else {"template": template}
    if priority is not None:
        job["priority"] = priority.value
    body: dict[str, Any] = {
        "job": job,
        "timezone": timezone,
        "overlap": overlap.value,
        "missed": missed.value,
        "paused": paused,
    }
    if cron is not None:
        body["cron"] = cron
    if every is not None:
        body["interval_s"] = duration("--every", every)
    if jitter is not None:
        body["jitter_s"] = duration("--jitter", jitter)
    if grace is not None:
        body["grace_s"] = duration("--grace", grace)
    if name is not None:
        body["name"] = name
    extra_inputs = parse_inputs(inputs) if inputs else {}
    with api_errors(), make_client(url, token) as client:
        if extra_inputs:
            earlier = job.get("inputs")
            job["inputs"] = {**(earlier if isinstance(earlier, dict) else {}), **upload_inputs(client, extra_inputs)}
        schedule = client.create_schedule(body)
    print(schedule.id, flush=True)
    for local in schedule.next_fire_local[:3]:
        print(f"  next: {local}")


@schedule_app.command("list")
def list_schedules(
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """List schedules: when they run, the next fire time, the last run."""
    from rich.markup import escape
    from rich.table import Table

    with api_errors(), make_client(url, token) as client:
        found = client.schedules()
    if as_json:
        print("[" + ",".join(s.model_dump_json() for s in found) + "]")
        return
    table = Table()
    table.add_column("id", no_wrap=True)
    for column in ("name", "state", "when", "next", "last run", "fired", "skipped"):
        table.add_column(column, overflow="fold")
    for schedule in found:
        last = schedule.last_runs[0] if schedule.last_runs else None
        last_text = "-" if last is None else f"{last.state} {last.job_id or last.reason or ''}".strip()
        table.add_row(
            schedule.id,
            escape(schedule.name or "-"),
            schedule.state,
            escape(_when(schedule)),
            _clock(schedule.next_fire_at[0] if schedule.next_fire_at else None),
            escape(last_text),
            str(schedule.fired),
            str(schedule.skipped),
        )
    out_console().print(table)


@schedule_app.command("show")
def show(
    schedule_id: ScheduleArg,
    runs: Annotated[int, typer.Option(min=0, max=10_000, help="last runs shown")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """A schedule: its next fire times and its last runs with their job ids."""
    from rich.markup import escape
    from rich.table import Table

    with api_errors(), make_client(url, token) as client:
        schedule = client.schedule(schedule_id, runs=runs)
    if as_json:
        print(schedule.model_dump_json(indent=2))
        return
    console = out_console()
    console.print(f"{schedule.id} {escape(schedule.name or '')} · {schedule.state} · {escape(_when(schedule))}")
    console.print(f"overlap {schedule.overlap.value} · missed {schedule.missed.value} · jitter {schedule.jitter_s:g}s")
    for local in schedule.next_fire_local:
        console.print(f"  next: {local}")
    table = Table(title="last runs")
    for column in ("fire time", "state", "job", "reason"):
        table.add_column(column, overflow="fold")
    for run in schedule.last_runs:
        fire = _clock(run.fire_at) + (f" … {_clock(run.until)} ({run.count})" if run.until else "")
        table.add_row(fire, run.state, run.job_id or "-", escape(run.reason or run.error or ""))
    console.print(table)


@schedule_app.command("pause")
def pause(schedule_id: ScheduleArg, url: UrlOption = None, token: TokenOption = None) -> None:
    """Make no more jobs until resumed (a job running now goes on)."""
    with api_errors(), make_client(url, token) as client:
        schedule = client.pause_schedule(schedule_id)
    print(f"{schedule.id} {schedule.state}")


@schedule_app.command("resume")
def resume(schedule_id: ScheduleArg, url: UrlOption = None, token: TokenOption = None) -> None:
    """Fire again, from the next fire time after now."""
    with api_errors(), make_client(url, token) as client:
        schedule = client.resume_schedule(schedule_id)
    print(f"{schedule.id} {schedule.state}")
    for local in schedule.next_fire_local[:1]:
        print(f"  next: {local}")


@schedule_app.command("rm")
def remove(schedule_id: ScheduleArg, url: UrlOption = None, token: TokenOption = None) -> None:
    """Delete a schedule; the jobs it made stay."""
    with api_errors(), make_client(url, token) as client:
        client.delete_schedule(schedule_id)
    print(f"{schedule_id} deleted")
