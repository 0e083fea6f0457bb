"""Built-in `ci_lint` plugin: pyflakes over the Python files of a source tar, in process."""

from __future__ import annotations

import fnmatch
import importlib.util
from pathlib import PurePosixPath
from typing import Any

from edgefleet.plugin_context import PluginContext
from edgefleet.pluginkit.actions import dispatch
from edgefleet.pluginkit.archive import open_tar

DEFAULT_MAX_ISSUES = 50
DEFAULT_MAX_FILE_KB = 2048
MAX_MESSAGE_CHARS = 500


def run(ctx: PluginContext, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """Entry point named in plugin.yaml."""
    return dispatch(ctx, action, args, plugin="ci_lint", actions={"pyflakes": lint})


class _Collector:
    """A pyflakes reporter that keeps every finding as a dict."""

    def __init__(self) -> None:
        self.issues: list[dict[str, Any]] = []

    def unexpectedError(self, filename: str, msg: str) -> None:
        self.issues.append({"path": filename, "line": 1, "col": 1, "code": "UnexpectedError", "message": str(msg)})

    def syntaxError(self, filename: str, msg: str, lineno: int | None, offset: int | None, text: str | None) -> None:
        self.issues.append(
            {
                "path": filename,
                "line": max(lineno or 0, 1),
                "col": max(offset or 1, 1),
                "code": "SyntaxError",
                "message": f"syntax error: {msg}",
            }
        )

    def flake(self, message: Any) -> None:
        self.issues.append(
            {
                "path": message.filename,
                "line": int(message.lineno),
                "col": int(getattr(message, "col", 0) or 0) + 1,  # pyflakes counts from 0
                "code": type(message).__name__,
                "message": (message.message % message.message_args)[:MAX_MESSAGE_CHARS],
            }
        )


def skipped_result(message: str) -> dict[str, Any]:
    return {
        "skipped": True,
        "linter": "pyflakes",
        "files": 0,
        "issue_count": 0,
        "issues": [],
        "truncated": False,
        "message": message,
    }


def lint(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    archive_arg = args.get("archive")
    if archive_arg is None:
        ctx.progress(1.0, "no new commits: nothing to lint")
        return skipped_result("no new commits: lint not run")
    max_issues = int(args.get("max_issues", DEFAULT_MAX_ISSUES))
    excludes = [str(p) for p in args.get("exclude") or []]
    max_bytes = int(args.get("max_file_kb", DEFAULT_MAX_FILE_KB)) * 1024

    import pyflakes
    from pyflakes.api import check

    archive = ctx.input_path(str(archive_arg))
    collector = _Collector()
    files = 0
    too_large: list[str] = []
    with open_tar(archive) as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.isfile()
            and m.name.endswith(".py")
            and not any(fnmatch.fnmatch(_clean(m.name), pattern) for pattern in excludes)
        ]
        for index, member in enumerate(members):
            ctx.check_cancelled()
            name = _clean(member.name)
            if member.size > max_bytes:
                too_large.append(name)
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            try:
                source = importlib.util.decode_source(handle.read())
            except (SyntaxError, UnicodeDecodeError, LookupError) as exc:
                collector.unexpectedError(name, f"cannot decode source: {exc}")
                files += 1
                continue
            try:
                check(source, name, collector)
            except RecursionError:
                collector.unexpectedError(name, "too deeply nested to check")
            files += 1
            if index % 20 == 0:
                ctx.progress(index / max(1, len(members)), f"{index} of {len(members)} files")

    issues = sorted(collector.issues, key=lambda i: (i["path"], i["line"], i["col"]))
    message = f"pyflakes: {len(issues)} issue{'s' if len(issues) != 1 else ''} in {files} files"
    if too_large:
        message += f" ({len(too_large)} files over {max_bytes // 1024} KB not checked)"
    ctx.progress(1.0, message)
    return {
        "skipped": False,
        "linter": f"pyflakes {pyflakes.__version__}",
        "files": files,
        "issue_count": len(issues),
        "issues": issues[:max_issues],
        "truncated": len(issues) > max_issues,
        "not_checked": too_large[:max_issues],
        "message": message,
    }


def _clean(name: str) -> str:
    """The member's path as the repository shows it (no leading './')."""
    return str(PurePosixPath(name))
