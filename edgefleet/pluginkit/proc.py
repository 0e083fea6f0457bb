"""Running a child command under a plugin's deadline and cancellation.

A plugin that starts a program (pytest, git, ffmpeg) must never leave it
running: not after a timeout, not after a cancel, not after its own error.
The safe way is to start it as the leader of its own process group
(`start_new_session=True`), so that everything it starts in turn can be
signalled at once with `os.killpg`, and to wait for it in short slices while
looking at `ctx.cancelled` in between. `run_in_group` does exactly that;
`supervise` is the waiting loop on its own, for a child that must stay in the
plugin's group (the sandbox then kills both together).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from edgefleet.plugin_context import PluginContext

from .actions import stop_cancelled

# How long the group gets to die after SIGKILL before we stop waiting for it.
KILL_WAIT_S = 5.0

Stop = Callable[[subprocess.Popen[Any]], None]


@dataclass(frozen=True)
class Outcome:
    """How a supervised child ended.

    `stdout`/`stderr` are what it wrote to pipes (None without pipes, and
    after a timeout: the stop step drains and drops them). `returncode` is
    None only if the child could not be reaped even after SIGKILL.
    """

    returncode: int | None
    stdout: bytes | None
    stderr: bytes | None
    timed_out: bool


def scrubbed_env(keep: Iterable[str], overrides: Mapping[str, str]) -> dict[str, str]:
    """An environment of only the `keep` variables of this process that are set, plus `overrides`.

    The sandbox's own environment may hold secrets and settings meant for the
    worker; a child gets nothing it was not explicitly given. Plugins usually
    point HOME (and TMPDIR) at their workspace so that the child writes no dot
    files anywhere else.
    """
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(overrides)
    return env


def signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    """Send `sig` to the child's whole process group; a group that is already gone is fine."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stop_group(
    proc: subprocess.Popen[Any], *, interrupt_grace: float | None = None, kill_wait: float = KILL_WAIT_S
) -> None:
    """Stop the child's process group, optionally asking nicely first.

    With `interrupt_grace`, the group gets SIGINT and that many seconds to
    finish (pytest, for one, still writes its report when interrupted); then,
    or straight away without it, SIGKILL. Once the leader has exited the rest
    of the group is killed too, since children it started may still run, and
    any pipes are drained and closed so that nothing is left open.
    """
    steps = ((signal.SIGINT, interrupt_grace),) if interrupt_grace is not None else ()
    for sig, grace in (*steps, (signal.SIGKILL, kill_wait)):
        signal_group(proc, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue
        if sig != signal.SIGKILL:
            signal_group(proc, signal.SIGKILL)  # the leader is done; its children (if any) still go
        if proc.stdout is not None or proc.stderr is not None:
            proc.communicate()
        return


def kill_process(proc: subprocess.Popen[Any]) -> None:
    """Kill just the child and reap it: for a child in the plugin's own process group."""
    proc.kill()
    proc.wait()


def supervise(
    ctx: PluginContext,
    proc: subprocess.Popen[Any],
    *,
    stop: Stop,
    limit: float | None = None,
    on_timeout: Stop | None = None,
    poll: float = 0.1,
    tick: Callable[[], None] | None = None,
) -> Outcome:
    """Wait for `proc` in slices of `poll` seconds, stopping it on cancel or after `limit` seconds.

    On cancel: `stop(proc)`, then SubtaskCancelled is raised (see
    `actions.stop_cancelled`). After `limit`: `on_timeout(proc)` (or `stop`)
    and an Outcome with `timed_out` set, so that the caller can still report
    what the child got done. `tick` runs once per slice while the child runs
    (e.g. to report progress). Whatever goes wrong in here, the child is
    stopped before the exception leaves: it is never left running.
    """
    started = time.monotonic()
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=poll)  # also drains pipes, if any
                return Outcome(proc.returncode, out, err, timed_out=False)
            except subprocess.TimeoutExpired:
                pass
            if ctx.cancelled:
                stop(proc)
                stop_cancelled(ctx)
            if limit is not None and time.monotonic() - started > limit:
                (on_timeout or stop)(proc)
                return Outcome(proc.returncode, None, None, timed_out=True)
            if tick is not None:
                tick()
    finally:
        if proc.poll() is None:  # an unexpected error above: never leave the child running
            stop(proc)


def run_in_group(
    ctx: PluginContext,
    command: list[str],
    *,
    limit: float | None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = subprocess.DEVNULL,
    interrupt_grace: float | None = None,
    poll: float = 0.1,
) -> Outcome:
    """Run `command` as the leader of a new process group, without stdin, under `supervise`.

    A cancel kills the whole group at once and raises SubtaskCancelled. After
    `limit` seconds the group is stopped (with SIGINT first when
    `interrupt_grace` is given) and the Outcome says `timed_out`. Pass
    `subprocess.PIPE` for `stdout`/`stderr` to get the output back.
    OSError from starting the command (e.g. FileNotFoundError for a missing
    program) is the caller's to handle.
    """
    proc = subprocess.Popen(
        command,
        cwd=None if cwd is None else str(cwd),
        env=None if env is None else dict(env),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
    )
    return supervise(
        ctx,
        proc,
        limit=limit,
        poll=poll,
        stop=stop_group,
        on_timeout=lambda p: stop_group(p, interrupt_grace=interrupt_grace),
    )
