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

The fork itself (about a millisecond of page tables here, more for a larger plugin) is
paid between subtasks, not in one: after reporting `ended`, the loop forks the next
subtask's process ahead, a spare that waits on a pipe of its own for its `run` message.
What does not depend on the subtask (the full filter) it does while it waits; its Landlock
layer, which names the subtask's workspace, once it has the message. It is forked from the
same post-import state a fork on demand would be (the executor never runs plugin code),
after the sweep and the emptying of `/tmp`, so it holds nothing of the subtask before it.
While it waits it is named `SPARE_NAME`, so that the worker's memory check of the executor
does not count the pages it shares with it twice.

A plugin whose manifest says `isolation: shared` is served without forking, under bwrap
(workers/sandbox_shared.py).
"""

from __future__ import annotations

import functools
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

# prctl(2) options: the process's name (at most 15 bytes) and its parent-death signal.
PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
SPARE_NAME = "edgefleet-spare"
CATCHABLE = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def serve(
    stdin: _Lines,
    channel: _Channel,
    image: dict[str, Any],
    function: Callable[..., Any],
    setup_error: str,
) -> None:
    """Serve `run` messages one at a time until the worker closes the pipe."""
    # A subtask may signal its executor (same uid): only SIGKILL and SIGSTOP could stop it then,
    # and as a pid namespace's init (bwrap) it takes neither from inside.
    for signum in CATCHABLE:
        signal.signal(signum, signal.SIG_IGN)
    image = {**image, "seccomp_program": _subtask_filter(image)}
    if sys.platform.startswith("linux"):
        _libc()
    import edgefleet.plugin_context  # noqa: F401 - imported once here, not in every subtask's process

    if image.get("shared") and os.environ.get("EDGEFLEET_SANDBOX") == "bwrap" and not setup_error:
        from edgefleet.workers import sandbox_shared

        sandbox_shared.serve(stdin, channel, image, function)
        return

    # The first subtask's process too is forked ahead, while the executor waits for work.
    spare = None if setup_error else _fork_spare(channel, image, function)
    try:
        while line := stdin.next():
            message = json.loads(line)
            if message.get("type") != "run":
                continue  # a cancel or model reply that arrived after its subtask ended
            if setup_error:
                channel.send(protocol.error("setup", setup_error))
                channel.send(protocol.ended(None, None, 0.0, 0))
                return
            if spare is None:
                spare = _fork_spare(channel, image, function)
            status, usage = _run_in(spare, stdin, line)
            spare = None
            end_subtask(channel, status, usage)
            spare = _fork_spare(channel, image, function)
    finally:
        if spare is not None:
            spare.discard()


def end_subtask(channel: _Channel, status: int | None, usage: Any) -> None:
    """After the subtask's process ended: nothing of it left running or in /tmp, then `ended`."""
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


class _Spare:
    """A forked process waiting for its subtask's `run` message on its own pipe."""

    # A plain class: `dataclasses` would add ~9 ms of imports to every executor's start.
    def __init__(self, pid: int, spec: int, control: int) -> None:
        self.pid = pid
        self.spec = spec  # the write end of the pipe its `run` message comes through
        self.control = control  # the write end of its control pipe (cancel, model replies)

    def discard(self) -> None:
        """Not needed any more: the end of its spec pipe makes it exit; reaped here."""
        os.close(self.spec)
        os.close(self.control)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _fork_spare(channel: _Channel, image: dict[str, Any], function: Callable[..., Any]) -> _Spare:
    from edgefleet.workers.sandbox_launcher import SubtaskControl, _Lines, run_with_control

    spec_read, spec_write = os.pipe()
    control_read, control_write = os.pipe()
    parent, name = os.getpid(), _executor_name()
    pid = os.fork()
    if pid == 0:  # the next subtask's process
        code = 0
        try:
            for signum in CATCHABLE:
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.close(spec_write)
            os.close(control_write)
            _die_with(parent)
            _rename(SPARE_NAME)
            # What does not depend on the subtask is done before it is known: the full filter.
            _narrow(image)
            control = SubtaskControl(channel, _Lines(control_read))
            line = _Lines(spec_read).next()
            os.close(spec_read)
            if not line:
                os._exit(0)  # discarded: the executor is ending
            _rename(name)
            spec = json.loads(line)
            _confine(image, spec)
            run_with_control(channel, image, function, spec, control)
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
    os.close(spec_read)
    os.close(control_read)
    return _Spare(pid, spec_write, control_write)


def _run_in(spare: _Spare, stdin: _Lines, line: str) -> tuple[int | None, Any]:
    """Hand the `run` message to the spare and relay to it until it ends."""
    child = os.pidfd_open(spare.pid)
    try:
        try:
            os.write(spare.spec, line.encode())
        except OSError:
            pass  # it died waiting (killed from outside): its exit status says so
        os.close(spare.spec)
        _relay(stdin, child, spare.control, spare.pid)
    finally:
        os.close(spare.control)
        os.close(child)
    _, status, usage = os.wait4(spare.pid, 0)
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


@functools.cache
def _libc() -> Any:
    """Loaded once, by the executor: its forks inherit it instead of each loading it again."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int | bytes) -> None:
    if sys.platform.startswith("linux"):
        _libc().prctl(option, value)


def _die_with(parent: int) -> None:
    """SIGKILL when the executor ends (and now, if it ended before this could be asked)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


@functools.cache
def _executor_name() -> str:
    """The executor's process name (/proc/<pid>/comm), read once: its forks start with it."""
    try:
        with open("/proc/self/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _rename(name: str) -> None:
    """Set this process's name (/proc/<pid>/comm)."""
    if name:
        _prctl(PR_SET_NAME, name.encode()[:15])


def _narrow(image: dict[str, Any]) -> None:
    """In the child, before its subtask is known: no stdin, the full filter."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    load_filter(image)


def load_filter(image: dict[str, Any]) -> None:
    """The plugin's full seccomp filter, on this process (and what it starts) from now on."""
    if image.get("seccomp", True):
        from edgefleet.workers.seccomp_filter import install, load_program

        if image.get("seccomp_program"):
            load_program(image["seccomp_program"])
        else:  # compiling it ahead failed: build it here (and fail this subtask if that fails too)
            install(**_filter_permissions(image))


def _confine(image: dict[str, Any], spec: dict[str, Any]) -> None:
    """Under Landlock, a layer of the child's own: its workspace, its own /proc entry."""
    rules = image.get("landlock")
    if rules is not None:
        from edgefleet.workers.landlock import restrict

        read = [path for path in rules["read"] if path != "/proc"] + ["/proc/self"]
        slots = set(image.get("executor_slots", []))
        write = [spec["workspace"], *(path for path in rules["write"] if path not in slots)]
        restrict(read, write, rules["list"])


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
