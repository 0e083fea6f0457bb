"""Built-in `ci_tests` plugin: unpack a source tree and run its pytest suite under a timeout.

The counts come from pytest's JUnit XML report (not from parsing its console
output). pytest runs as `python -m pytest` with this interpreter, in its own
process group and a scrubbed environment whose HOME and TMPDIR are inside the
workspace; a timeout interrupts it (SIGINT, so that it still writes what it
has) and then kills the whole group.
"""

from __future__ import annotations

import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from edgefleet.plugin_context import PluginContext
from edgefleet.pluginkit.actions import dispatch
from edgefleet.pluginkit.archive import unpack_tar
from edgefleet.pluginkit.proc import run_in_group, scrubbed_env

DEFAULT_TIMEOUT_S = 600.0
# Left between the pytest timeout and the step's own deadline to stop it and report.
DEADLINE_MARGIN_S = 5.0
INTERRUPT_GRACE_S = 3.0
POLL_S = 0.1
MAX_MESSAGE_CHARS = 500
LOG_TAIL_CHARS = 2000


def run(ctx: PluginContext, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """Entry point named in plugin.yaml."""
    return dispatch(ctx, action, args, plugin="ci_tests", actions={"pytest": run_pytest})


def skipped_result(message: str) -> dict[str, Any]:
    return {
        "skipped": True,
        "ok": True,
        "completed": True,
        "passed": 0,
        "failed": 0,
        "errors": 0,
        "skipped_tests": 0,
        "total": 0,
        "timed_out": False,
        "exit_code": None,
        "duration_s": 0.0,
        "log": None,
        "junit": None,
        "failures": [],
        "message": message,
    }


def pytest_env(ctx: PluginContext, tmp: Path) -> dict[str, str]:
    return scrubbed_env(
        ("PATH", "LANG", "LC_ALL", "TZ"),
        {
            "HOME": str(ctx.workspace),
            "TMPDIR": str(tmp),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "PY_COLORS": "0",
        },
    )


def parse_junit(path: Path, max_listed: int) -> dict[str, Any]:
    """Counts per test case: a failure beats an error beats a skip; anything else passed."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped_tests": 0}
    failures: list[dict[str, str]] = []
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        if not case.get("name"):
            continue  # what an interrupted pytest writes for the test it was stopped in
        kinds = {child.tag for child in case}
        test = "::".join(part for part in (case.get("classname", ""), case.get("name", "")) if part)
        if "failure" in kinds or "error" in kinds:
            kind = "failure" if "failure" in kinds else "error"
            counts["failed" if kind == "failure" else "errors"] += 1
            if len(failures) < max_listed:
                element = case.find(kind)
                message = (element.get("message") or element.text or "") if element is not None else ""
                failures.append({"test": test, "kind": kind, "message": message.strip()[:MAX_MESSAGE_CHARS]})
        elif "skipped" in kinds:
            counts["skipped_tests"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


def _log_tail(log: Path) -> str:
    try:
        return log.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:].strip()
    except OSError:
        return ""


def run_pytest(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    archive_arg = args.get("archive")
    if archive_arg is None:
        ctx.progress(1.0, "no new commits: nothing to test")
        return skipped_result("no new commits: tests not run")
    timeout = float(args.get("timeout", DEFAULT_TIMEOUT_S))
    if timeout <= 0:
        raise ValueError("timeout: must be greater than 0")
    extra = [str(a) for a in args.get("args") or []]
    max_listed = int(args.get("max_failures_listed", 20))

    ctx.progress(0.05, "unpacking the source tree")
    src = ctx.workspace_path("src")
    unpack_tar(ctx.input_path(str(archive_arg)), src)
    tmp = ctx.workspace_path("tmp")
    tmp.mkdir(exist_ok=True)
    junit = ctx.workspace_path("junit.xml")
    junit.unlink(missing_ok=True)
    log = ctx.workspace_path("pytest.log")

    limit = min(timeout, max(1.0, ctx.time_left() - DEADLINE_MARGIN_S))
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
        f"--junitxml={junit}",
        "-o",
        "junit_family=xunit2",
        *extra,
    ]
    ctx.progress(0.1, f"running pytest (limit {limit:g} s)")
    started = time.monotonic()
    with log.open("wb") as out:
        # Interrupted at the limit (SIGINT, so that pytest still writes its report), then killed.
        outcome = run_in_group(
            ctx,
            command,
            limit=limit,
            cwd=src,
            env=pytest_env(ctx, tmp),
            stdout=out,
            stderr=subprocess.STDOUT,
            interrupt_grace=INTERRUPT_GRACE_S,
            poll=POLL_S,
        )
    duration = round(time.monotonic() - started, 3)
    timed_out = outcome.timed_out
    exit_code = outcome.returncode

    report_problem: str | None = None
    parsed: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped_tests": 0, "failures": []}
    if junit.is_file() and junit.stat().st_size > 0:
        try:
            parsed = parse_junit(junit, max_listed)
        except ET.ParseError as exc:
            report_problem = f"unreadable JUnit report: {exc}"
    else:
        report_problem = "pytest wrote no JUnit report"

    total = parsed["passed"] + parsed["failed"] + parsed["errors"]
    # 0: all passed, 1: some failed, 2: interrupted (e.g. collection errors), 5: no tests.
    completed = not timed_out and report_problem is None and exit_code in (0, 1, 2, 5)
    ok = completed and exit_code in (0, 5) and parsed["failed"] == 0 and parsed["errors"] == 0
    counts = (
        f"{parsed['passed']} passed, {parsed['failed']} failed, {parsed['errors']} errors, "
        f"{parsed['skipped_tests']} skipped"
    )
    if timed_out:
        message = f"pytest timed out after {limit:g} s ({counts} before it was stopped)"
    elif not completed:
        message = f"pytest exited with code {exit_code}: {report_problem or counts}"
        tail = _log_tail(log)
        if tail:
            message += "\n" + tail
    else:
        message = f"{counts} in {duration:g} s" + (f" (exit code {exit_code})" if exit_code not in (0, 1) else "")
    ctx.progress(1.0, message.splitlines()[0])
    return {
        "skipped": False,
        "ok": ok,
        "completed": completed,
        **{k: parsed[k] for k in ("passed", "failed", "errors", "skipped_tests")},
        "total": total,
        "timed_out": timed_out,
        "exit_code": exit_code,
        "duration_s": duration,
        "log": str(log),
        "junit": str(junit) if junit.is_file() else None,
        "failures": parsed["failures"],
        "message": message,
    }
