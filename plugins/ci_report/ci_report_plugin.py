"""Built-in `ci_report` plugin: a Markdown report and a failure rate from the CI steps' outputs."""

from __future__ import annotations

from typing import Any

from edgefleet.plugin_context import PluginContext
from edgefleet.pluginkit.actions import dispatch

DEFAULT_MAX_LISTED = 20


def run(ctx: PluginContext, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """Entry point named in plugin.yaml."""
    return dispatch(ctx, action, args, plugin="ci_report", actions={"markdown": write_report})


def failure_rate(detect: dict[str, Any], tests: dict[str, Any]) -> float:
    """(failed + errors) / (passed + failed + errors); 1.0 for a suite that never finished."""
    if not detect.get("changed", True) or tests.get("skipped"):
        return 0.0
    if tests.get("timed_out") or not tests.get("completed", True):
        return 1.0
    bad = int(tests.get("failed", 0)) + int(tests.get("errors", 0))
    total = bad + int(tests.get("passed", 0))
    return round(bad / total, 4) if total else 0.0


def _cell(text: Any) -> str:
    """Safe inside a Markdown table cell: one line, no column breaks."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: Any) -> str:
    return "`" + str(text).replace("`", "'") + "`"


def _pct(rate: float) -> str:
    return f"{rate * 100:.1f}%"


def render(
    detect: dict[str, Any],
    tests: dict[str, Any],
    lint: dict[str, Any],
    rate: float,
    threshold: float | None,
    max_listed: int,
) -> str:
    repo = detect.get("repo", "?")
    head = str(detect.get("head") or "")
    lines = [f"# CI report: {repo} @ {head[:12] or '?'}", ""]
    lines.append(f"- Branch: {_code(detect.get('branch', 'HEAD'))}, head {_code(head)}")
    if detect.get("since"):
        lines.append(f"- Since: {_code(detect['since'])}")

    if not detect.get("changed", True):
        lines += ["", f"**No new commits** since {_code(head[:12])}: tests and lint were not run.", ""]
        return "\n".join(lines)

    above = threshold is not None and rate > threshold
    verdict = (
        "FAILING" if (tests.get("failed") or tests.get("errors") or not tests.get("completed", True)) else "PASSING"
    )
    status = f"- Status: **{verdict}**, test failure rate **{_pct(rate)}**"
    if threshold is not None:
        status += f" ({'above' if above else 'not above'} the alert threshold {_pct(threshold)})"
    lines += [status, f"- Lint: {int(lint.get('issue_count', 0))} issues", ""]

    commits = detect.get("commits") or []
    count = int(detect.get("count", len(commits)))
    lines += [f"## Commits ({count} new)", ""]
    if commits:
        lines += ["| commit | author | date | subject |", "|---|---|---|---|"]
        for commit in commits[:max_listed]:
            lines.append(
                f"| {_code(str(commit.get('sha', ''))[:12])} | {_cell(commit.get('author', ''))} "
                f"| {_cell(commit.get('date', ''))} | {_cell(commit.get('subject', ''))} |"
            )
        if count > min(len(commits), max_listed):
            lines.append(f"| ... | | | {count - min(len(commits), max_listed)} more |")
    else:
        lines.append("No new commits in the history (the head moved to an older commit).")
    lines.append("")

    lines += ["## Tests", ""]
    if tests.get("timed_out"):
        lines.append(f"**Timed out.** {tests.get('message', '')}")
    elif not tests.get("completed", True):
        lines.append(f"**The test run did not finish.** {_cell(tests.get('message', ''))}")
    lines += [
        "| passed | failed | errors | skipped | failure rate |",
        "|---|---|---|---|---|",
        (
            f"| {tests.get('passed', 0)} | {tests.get('failed', 0)} | {tests.get('errors', 0)} "
            f"| {tests.get('skipped_tests', 0)} | {_pct(rate)} |"
        ),
        "",
    ]
    failures = tests.get("failures") or []
    if failures:
        lines += ["### Failing tests", ""]
        for failure in failures[:max_listed]:
            message = str(failure.get("message", "")).strip().splitlines()
            lines.append(
                f"- {_code(failure.get('test', '?'))} ({failure.get('kind', 'failure')})"
                + (f": {_cell(message[0])}" if message else "")
            )
        lines.append("")
    if tests.get("log"):
        lines += [f"Full output: {_code(tests['log'])}", ""]

    lines += [f"## Lint ({lint.get('linter', 'lint')})", ""]
    issues = lint.get("issues") or []
    issue_count = int(lint.get("issue_count", len(issues)))
    if not issue_count:
        lines.append(f"No issues in {lint.get('files', 0)} files.")
    else:
        lines.append(f"{issue_count} issues in {lint.get('files', 0)} files:")
        lines.append("")
        for issue in issues[:max_listed]:
            where = f"{issue.get('path', '?')}:{issue.get('line', 0)}:{issue.get('col', 0)}"
            lines.append(f"- {_code(where)} {issue.get('code', '')}: {_cell(issue.get('message', ''))}")
        if issue_count > min(len(issues), max_listed):
            lines.append(f"- ... and {issue_count - min(len(issues), max_listed)} more")
    lines.append("")
    return "\n".join(lines)


def write_report(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    detect = args.get("detect") or {}
    tests = args.get("tests") or {}
    lint = args.get("lint") or {}
    for field, value in (("detect", detect), ("tests", tests), ("lint", lint)):
        if not isinstance(value, dict):
            raise ValueError(f"{field}: must be an object (the output of the {field} step)")
    threshold = args.get("threshold")
    threshold = None if threshold is None else float(threshold)
    max_listed = int(args.get("max_listed", DEFAULT_MAX_LISTED))
    changed = bool(detect.get("changed", True))

    rate = failure_rate(detect, tests)
    text = render(detect, tests, lint, rate, threshold, max_listed)
    target = ctx.workspace_path(str(args.get("filename") or "report.md"))
    part = target.with_name(f".{target.name}.part")
    part.write_text(text, encoding="utf-8")
    part.replace(target)

    summary = {
        "repo": detect.get("repo"),
        "branch": detect.get("branch"),
        "head": detect.get("head"),
        "since": detect.get("since"),
        "changed": changed,
        "new_commits": int(detect.get("count", 0)) if changed else 0,
        "commits": [
            {k: c.get(k) for k in ("sha", "author", "subject")} for c in (detect.get("commits") or [])[:max_listed]
        ],
        "tests": {
            k: tests.get(k)
            for k in ("skipped", "completed", "passed", "failed", "errors", "skipped_tests", "total", "timed_out")
        },
        "failing_tests": [f.get("test") for f in (tests.get("failures") or [])[:max_listed]],
        "lint_issues": int(lint.get("issue_count", 0)),
        "failure_rate": rate,
        "report": str(target),
    }
    ctx.progress(1.0, f"failure rate {_pct(rate)}" if changed else "no new commits")
    return {
        "path": str(target),
        "failure_rate": rate,
        "changed": changed,
        "above_threshold": None if threshold is None else rate > threshold,
        "summary": summary,
    }
