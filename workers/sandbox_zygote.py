"""An executor's loop inside the sandbox: a process per subtask, forked after the plugin's import.

The launcher (workers/sandbox_launcher.py) limits itself, filters its system calls
and imports the plugin once; then, for each `run` the worker sends, this loop forks
a child that narrows itself to the plugin's full filter (and, under Landlock, to
its own workspace and `/proc/self`), enters that subtask's workspace and runs the
action. The fork gives every subtask the plugin's module state as it was after the
import, never as an earlier subtask left it. When the child has ended this loop
kills whatever it left running (the executor is its subreaper, so a daemonised
grandchild cannot slip away), empties the private `/tmp` (under bwrap), and
reports `ended` with the child's exit status and resource use.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgefleet.workers import sandbox_protocol as protocol

if TYPE_CHECKING:
    from edgefleet.workers.sandbox_launcher import _Channel, _Lines

CATCHABLE = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
RunSubtask = Callable[["_Channel", dict[str, Any], Callable[..., Any], dict[str, Any], "_Lines"], None]


def serve(
    stdin: _Lines,
    channel: _Channel,
    image: dict[str, Any],
    function: Callable[..., Any],
    setup_error: str,
    run_subtask: RunSubtask,
) -> None:
    """Serve `run` messages one at a time until the worker closes the pipe."""
    # A subtask may signal its executor (same uid): only SIGKILL and SIGSTOP could stop it then,
    # and as a pid namespace's init (bwrap) it takes neither from inside.
    for signum in CATCHABLE:
        signal.signal(signum, signal.SIG_IGN)
    image = {**image, "seccomp_program": _subtask_filter(image)}
    while line := stdin.next():
        message = json.loads(line)
        if message.get("type") != "run":
            continue  # a cancel or model reply that arrived after its subtask ended
        if setup_error:
            channel.send(protocol.error("setup", setup_error))
            channel.send(protocol.ended(None, None, 0.0, 0))
            return
        status, usage = _fork_one(stdin, channel, image, function, message, run_subtask)
        _sweep()
        if os.environ.get("EDGEFLEET_SANDBOX") == "bwrap":
            _empty("/tmp")
        code = os.waitstatus_to_exitcode(status) if status is not None else None
        channel.send(
            protocol.ended(
                code if code is not None and code >= 0 else None,
                -code if code is not None and code < 0 else None,
                usage.ru_utime + usage.ru_stime if usage else 0.0,
                usage.ru_maxrss if usage else 0,
            )
        )


def _fork_one(
    stdin: _Lines,
    channel: _Channel,
    image: dict[str, Any],
    function: Callable[..., Any],
    spec: dict[str, Any],
    run_subtask: RunSubtask,
) -> tuple[int | None, Any]:
    from edgefleet.workers.sandbox_launcher import _Lines

    control_read, control_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the subtask's process
        code = 0
        try:
            for signum in CATCHABLE:
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.close(control_write)
            _narrow(image, spec)
            run_subtask(channel, image, function, spec, _Lines(control_read))
        except BaseException as exc:  # a setup step of this child failed: the subtask's error
            channel.send(protocol.error("exception", f"{type(exc).__name__}: {exc}"))
            code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)
    os.close(control_read)
    child = os.pidfd_open(pid)
    try:
        _relay(stdin, child, control_write, pid)
    finally:
        os.close(control_write)
        os.close(child)
    _, status, usage = os.wait4(pid, 0)
    return status, usage


def _relay(stdin: _Lines, child: int, control: int, pid: int) -> None:
    """Pass the worker's cancel and model replies to the running child until it ends."""
    while True:
        ready = [stdin.fd] if stdin.pending() else select.select([stdin.fd, child], [], [])[0]
        if child in ready:
            return
        line = stdin.next()
        if not line:  # the worker is gone: so is the subtask
            os.kill(pid, signal.SIGKILL)
            return
        try:
            os.write(control, line.encode())
        except OSError:
            pass  # the child closed its end while ending


def _narrow(image: dict[str, Any], spec: dict[str, Any]) -> None:
    """In the child, before the subtask's code: die with the executor, no stdin, the full filter,
    and under Landlock a layer of its own (its workspace, its own /proc entry)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    rules = image.get("landlock")
    if rules is not None:
        from edgefleet.workers.landlock import restrict

        read = [path for path in rules["read"] if path != "/proc"] + ["/proc/self"]
        slots = set(image.get("executor_slots", []))
        write = [spec["workspace"], *(path for path in rules["write"] if path not in slots)]
        restrict(read, write, rules["list"])
    if image.get("seccomp", True):
        from edgefleet.workers.seccomp_filter import install, load_program

        if image.get("seccomp_program"):
            load_program(image["seccomp_program"])
        else:  # compiling it ahead failed: build it here (and fail this subtask if that fails too)
            install(**_filter_permissions(image))


def _filter_permissions(image: dict[str, Any]) -> dict[str, bool]:
    permissions = set(image["permissions"])
    return {
        "allow_subprocess": "subprocess" in permissions,
        "allow_network": bool({"network", "network_lan"} & permissions),
    }


def _subtask_filter(image: dict[str, Any]) -> bytes | None:
    """The subtasks' full seccomp filter, compiled once by the executor (see `compile_program`)."""
    if not image.get("seccomp", True):
        return None
    try:
        from edgefleet.workers.seccomp_filter import compile_program

        return compile_program(**_filter_permissions(image))
    except Exception:
        return None


def _children() -> list[int]:
    found: list[int] = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                found += [int(pid) for pid in f.read().split()]
        except OSError:
            continue
    return found


def _sweep() -> None:
    """Kill and reap every process still below the executor (orphans come to it: subreaper)."""
    for _ in range(10_000):
        children = _children()
        if not children:
            return
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _empty(folder: str) -> None:
    """The sandbox's private /tmp back to empty: a subtask's files there never reach the next.

    Never below a mount point: the folders bwrap made for the view's binds (a workspace root
    under /tmp) hold the executor's own root and mirror, which are not /tmp's to clear."""
    if not os.access(folder, os.W_OK):
        return  # a root worker's sandbox uid cannot create anything in it
    _clear(folder, os.lstat(folder).st_dev)


def _clear(folder: str, device: int) -> None:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
            if info.st_dev != device:
                continue  # a mount point
            if entry.is_dir(follow_symlinks=False):
                _clear(entry.path, device)
                os.rmdir(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
