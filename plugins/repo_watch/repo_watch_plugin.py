"""Built-in `repo_watch` plugin: new commits of a local git repository, and its head as a tar.

Stateless: the caller passes the last head it saw as `since` and stores the
`head` this step reports (see plugin.yaml). Git runs with a scrubbed
environment and its options given by `-c`, never from a ~/.gitconfig: the
sandbox's HOME is the workspace.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

from edgefleet.plugin_context import PluginContext
from edgefleet.pluginkit.actions import dispatch
from edgefleet.pluginkit.proc import run_in_group, scrubbed_env

ARCHIVE_NAME = "source.tar"
DEFAULT_MAX_COMMITS = 50
GIT_CALL_TIMEOUT_S = 120.0
POLL_S = 0.1
_SHA = re.compile(r"^[0-9a-fA-F]{4,64}$")
_REVISION = re.compile(r"^[A-Za-z0-9_./@{}~^][A-Za-z0-9_./@{}~^+-]*$")
# Field and record separators for `git log --format`: never in names or subjects.
_FS, _RS = "\x1f", "\x1e"


class GitError(RuntimeError):
    """A git command failed; the message names the repository and git's own words."""


def run(ctx: PluginContext, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """Entry point named in plugin.yaml."""
    return dispatch(ctx, action, args, plugin="repo_watch", actions={"detect": detect})


def git_env(ctx: PluginContext) -> dict[str, str]:
    """Only what git needs; no user or system config (options come as `-c`)."""
    return scrubbed_env(
        ("PATH", "LANG", "TZ"),
        {
            "HOME": str(ctx.workspace),
            "LC_ALL": "C",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_OPTIONAL_LOCKS": "0",  # a read must not take (or leave) locks in the user's repo
            "GIT_PAGER": "cat",
        },
    )


def git_command(repo: Path, *args: str) -> list[str]:
    return [
        "git",
        # The sandbox may present the repository as owned by another uid; we only read it.
        "-c",
        "safe.directory=*",
        "-c",
        "core.fsmonitor=false",
        "-c",
        "core.hooksPath=" + os.devnull,
        "-C",
        str(repo),
        *args,
    ]


def run_git(ctx: PluginContext, repo: Path, *args: str, timeout: float = GIT_CALL_TIMEOUT_S) -> str:
    """Run one git command in its own process group; stop it on cancel or timeout."""
    ctx.check_cancelled()
    limit = min(timeout, max(0.5, ctx.time_left()))
    try:
        outcome = run_in_group(
            ctx,
            git_command(repo, *args),
            limit=limit,
            env=git_env(ctx),
            cwd=ctx.workspace,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            poll=POLL_S,
        )
    except FileNotFoundError:
        raise GitError("git is not installed on this node") from None
    if outcome.timed_out:
        ctx.check_cancelled()  # past the subtask's own deadline: that is the error to report
        raise GitError(f"git {args[0]} in {repo} took longer than {limit:g} s")
    if outcome.returncode != 0:
        message = (outcome.stderr or b"").decode("utf-8", "replace").strip().splitlines()
        raise GitError(f"git {args[0]} in {repo} failed: {' / '.join(message[-3:]) or f'exit {outcome.returncode}'}")
    return (outcome.stdout or b"").decode("utf-8", "replace")


def _resolve_commit(ctx: PluginContext, repo: Path, revision: str, field: str) -> str:
    try:
        out = run_git(ctx, repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{revision}^{{commit}}")
    except GitError:
        out = ""
    sha = out.strip()
    if not sha:
        raise ValueError(f"{field}: {revision!r} is not a commit in {repo}")
    return sha


def _check_repo(ctx: PluginContext, repo: Path) -> None:
    if not repo.is_absolute():
        raise ValueError(f"repo: {str(repo)!r} must be an absolute path")
    if not repo.is_dir():
        raise ValueError(f"repo: {repo} is not a directory (or not readable here)")
    try:
        run_git(ctx, repo, "rev-parse", "--git-dir")
    except GitError as exc:
        raise ValueError(f"repo: {repo} is not a git repository ({exc})") from None


def detect(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    repo = Path(str(args.get("repo") or ""))
    branch = str(args.get("branch") or "HEAD")
    since_arg = args.get("since")
    max_commits = int(args.get("max_commits", DEFAULT_MAX_COMMITS))
    want_archive = bool(args.get("archive", True))
    if not _REVISION.match(branch):
        raise ValueError(f"branch: {branch!r} is not a revision name")
    if since_arg is not None and not _SHA.match(str(since_arg)):
        raise ValueError(f"since: {since_arg!r} must be a commit sha (4 to 64 hex digits)")
    if max_commits < 1:
        raise ValueError("max_commits: must be at least 1")

    _check_repo(ctx, repo)
    ctx.progress(0.1, "resolving head")
    try:
        head = _resolve_commit(ctx, repo, branch, "branch")
    except ValueError:
        if branch == "HEAD":
            raise ValueError(f"branch: the repository {repo} has no commits yet") from None
        raise
    since = _resolve_commit(ctx, repo, str(since_arg), "since") if since_arg is not None else None

    changed = head != since
    commits: list[dict[str, str]] = []
    count = 0
    if changed:
        span = f"{since}..{head}" if since else head
        count = int(run_git(ctx, repo, "rev-list", "--count", span).strip() or 0)
        log = run_git(
            ctx,
            repo,
            "log",
            f"--max-count={max_commits}",
            "--no-color",
            f"--format=%H{_FS}%an{_FS}%ae{_FS}%aI{_FS}%s{_RS}",
            span,
            "--",
        )
        for record in log.split(_RS):
            fields = record.strip("\n").split(_FS)
            if len(fields) == 5:
                sha, author, email, date, subject = fields
                commits.append({"sha": sha, "author": author, "email": email, "date": date, "subject": subject})

    archive: str | None = None
    if changed and want_archive:
        ctx.progress(0.5, f"exporting {head[:12]}")
        target = ctx.workspace_path(ARCHIVE_NAME)
        part = target.with_name(f".{target.name}.part")
        try:
            run_git(ctx, repo, "archive", "--format=tar", f"--output={part}", head)
            part.replace(target)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        archive = str(target)

    if not changed:
        message = f"no new commits since {head[:12]}"
    elif since is None:
        message = f"first run: head is {head[:12]} ({count} commits in its history)"
    else:
        message = f"{count} new commit{'s' if count != 1 else ''} since {since[:12]}, head {head[:12]}"
    ctx.progress(1.0, message)
    return {
        "repo": str(repo),
        "branch": branch,
        "head": head,
        "since": since,
        "changed": changed,
        "count": count,
        "truncated": count > len(commits),
        "commits": commits,
        "archive": archive,
        "message": message,
    }
