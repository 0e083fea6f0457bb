"""The sandbox's child side: limit itself, then run one plugin action and report over a pipe.

Protocol: the parent writes JSON lines to stdin: `prepare` (the plugin image:
plugin, folder, entry point, permissions, limits), then `run` (the subtask:
action, args, workspace, timeout, checkpoint), later possibly `cancel` and
`model_reply`. Between `prepare` and `run` the child limits itself, installs its
seccomp filter and imports the plugin, so a launcher can be started ahead of its
subtask (the worker's warm pool); a setup error is held until `run` so that it
fails that subtask. The child writes JSON lines to the original stdout:
`progress`, `checkpoint`, `model_call`, and finally `result` or `error`. The
plugin's own prints go to stderr, so they cannot corrupt the protocol.

rlimits are set here, in the child, not through `preexec_fn`: that is unsafe
in the threaded worker that starts us.
"""

from __future__ import annotations

import json
import os
import resource
import select
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

from edgefleet.workers import sandbox_protocol as protocol

MB = 1024 * 1024


class OutputTooLarge(ValueError):
    pass


class _Channel:
    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: protocol.FromLauncher) -> None:
        line = json.dumps(message)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


def _set_limits(limits: dict[str, Any], allow_subprocess: bool, extra_processes: int = 0) -> None:
    memory = int(limits["memory_mb"]) * MB
    cpu = int(limits["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # The soft limit sends SIGXCPU, the hard one SIGKILL a moment later.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 2))
    size = int(limits["max_file_mb"]) * MB
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if allow_subprocess:
        processes = int(limits["max_processes"]) + extra_processes
        resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))


class _ModelCalls:
    """ctx.model(...) calls: the worker process holds the warm models and makes the call."""

    def __init__(self, channel: _Channel, control: SubtaskControl) -> None:
        self._channel = channel
        self._control = control
        self._lock = threading.Lock()
        self._next = 0
        self._waiting: dict[int, tuple[threading.Event, list[dict[str, Any]]]] = {}

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._next += 1
            call_id = self._next
            done, box = threading.Event(), cast(list[dict[str, Any]], [])
            self._waiting[call_id] = (done, box)
        self._channel.send(cast(protocol.ModelCall, {"type": "model_call", "id": call_id, **request}))
        while not done.is_set():
            self._control.poll(0.2, done)
            if self._control.cancelled.is_set() and not done.is_set():
                return {"ok": False, "error": "subtask cancelled while waiting for the model"}
        return box[0]

    def answer(self, message: dict[str, Any]) -> None:
        with self._lock:
            waiting = self._waiting.pop(int(message["id"]), None)
        if waiting:
            waiting[1].append(message)
            waiting[0].set()

    def abandon(self) -> None:
        with self._lock:
            for done, box in self._waiting.values():
                box.append({"ok": False, "error": "the worker went away"})
                done.set()
            self._waiting.clear()


def _die_with_parent() -> None:
    """Without bwrap's --die-with-parent, a killed worker must not leave its plugin running."""
    if os.environ.get("EDGEFLEET_SANDBOX") == "bwrap":
        return  # bwrap's --die-with-parent covers it; in its pid namespace our parent is pid 1
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(1)


def _drop_privileges() -> None:
    """Become the sandbox's uid before reading anything: no root, no capabilities, no groups.

    The worker (root) starts us as root so that we can do this ourselves; under bwrap we hold
    only CAP_SETUID/CAP_SETGID until here, and a uid switch away from 0 clears them all."""
    uid = os.environ.pop("EDGEFLEET_SANDBOX_UID", "")
    if not uid:
        if os.geteuid() == 0:
            _drop_capabilities()
        return
    target = int(uid)
    os.setgroups([])
    os.setresgid(target, target, target)
    os.setresuid(target, target, target)
    if os.getuid() != target or os.geteuid() != target:
        os._exit(70)  # never run a plugin as root by mistake


def _drop_capabilities() -> None:
    """Root that could not switch uid (see SandboxPolicy.why_same_uid): keep uid 0 but no capability
    at all, now or after an exec (securebits locked), so DAC, Landlock and ptrace rules bind it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; an unknown cap number just fails
    # SECBIT_NOROOT, SECBIT_NO_SETUID_FIXUP, SECBIT_KEEP_CAPS off, each locked.
    libc.prctl(28, 0x01 | 0x02 | 0x04 | 0x08 | 0x20, 0, 0, 0)  # PR_SET_SECUREBITS

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3: two words
    if libc.capset(ctypes.byref(header), data) != 0:
        os._exit(71)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS


def _confine_files(rules: dict[str, list[str]] | None) -> None:
    if rules is None:
        return
    from edgefleet.workers.landlock import restrict

    restrict(rules["read"], rules["write"], rules["list"])


def _prepare(image: dict[str, Any]) -> Callable[..., Any]:
    """Limit this process and import the plugin: everything that depends on the manifest only.

    An executor (`serve: many`) forks a process per subtask after this: its own filter still
    allows that fork (never an exec without `subprocess`), and each subtask's process installs
    the plugin's full filter on top before any of the subtask's code runs."""
    permissions = set(image["permissions"])
    executor = image.get("serve") == "many"
    # An executor's own process counts against its uid's process limit: one more for it.
    _set_limits(image["limits"], "subprocess" in permissions, extra_processes=1 if executor else 0)
    if executor:
        _become_subreaper()
    _confine_files(image.get("landlock"))
    _filter(image, allow_fork=executor)
    from edgefleet.plugin_context import PluginContext  # noqa: F401 - imported now, not on the subtask's time
    from edgefleet.plugin_loader import load_entry_point

    sys.path.insert(0, image["folder"])  # plugins written as flat modules import siblings directly
    return load_entry_point(image["plugin"], Path(image["folder"]), image["entry_point"])


def _filter(image: dict[str, Any], *, allow_fork: bool) -> None:
    if not image.get("seccomp", True):
        return
    from edgefleet.workers.seccomp_filter import install

    permissions = set(image["permissions"])
    networked = bool({"network", "network_lan"} & permissions)
    install(allow_subprocess="subprocess" in permissions, allow_network=networked, allow_fork=allow_fork)


def _become_subreaper() -> None:
    """Whatever a subtask leaves running (a daemonised grandchild) is re-parented to the executor,
    which kills it before the next subtask: nothing of one subtask outlives it."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _enter_workspace(workspace: Path) -> None:
    os.chdir(workspace)
    os.environ["HOME"] = str(workspace)
    os.environ["TMPDIR"] = str(workspace / ".tmp")
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None:
        tempfile.tempdir = None  # type: ignore[attr-defined]  # set by the plugin's import to our first home


class _Lines:
    """JSON lines from a file descriptor, unbuffered beyond what it returns: an executor waits on
    the same descriptor with select() between subtasks, which a TextIO buffer would hide lines from."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""

    def next(self) -> str:
        """The next line, or "" at the end of the stream."""
        while b"\n" not in self._buffer:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                rest, self._buffer = self._buffer, b""
                return rest.decode()
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode() + "\n"

    def pending(self) -> bool:
        return b"\n" in self._buffer


class SubtaskControl:
    """The worker's messages to a running subtask (cancel, model replies), read when the plugin
    asks (is it cancelled? a model call waiting for its reply), not by a thread: a thread's start
    in a freshly forked process costs more CPU than a short subtask's whole run."""

    def __init__(self, channel: _Channel, control: _Lines) -> None:
        self.cancelled = threading.Event()
        self.models = _ModelCalls(channel, self)
        self._control = control
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        """The subtask has ended: its messages are no longer read here (an executor that runs
        subtasks in its own process reads its next `run` from the same stream)."""
        with self._lock:
            self._closed = True

    def is_cancelled(self) -> bool:
        self.poll(0.0)
        return self.cancelled.is_set()

    def poll(self, timeout: float, done: threading.Event | None = None) -> None:
        """Handle the messages that have arrived, waiting up to `timeout` seconds for the first
        (or until `done`). While one thread of the plugin reads, another does not wait for it
        longer than its own `timeout`: what arrives is handled by the reader either way."""
        got = self._lock.acquire(timeout=timeout) if timeout > 0 else self._lock.acquire(blocking=False)
        if not got:
            return
        try:
            if self._closed or (done is not None and done.is_set()):
                return
            if not self._control.pending() and not select.select([self._control.fd], [], [], timeout)[0]:
                return
            while True:
                line = self._control.next()
                if not line:
                    self._closed = True
                    self.cancelled.set()  # the parent closed the pipe: it is gone or wants us gone
                    self.models.abandon()
                    return
                self._handle(json.loads(line))
                if not self._control.pending() and not select.select([self._control.fd], [], [], 0)[0]:
                    return
        finally:
            self._lock.release()

    def _handle(self, message: dict[str, Any]) -> None:
        if message.get("type") == "cancel":
            self.cancelled.set()
        elif message.get("type") == "model_reply":
            self.models.answer(message)


def _run_subtask(
    channel: _Channel, image: dict[str, Any], function: Callable[..., Any], spec: dict[str, Any], control: _Lines
) -> None:
    """Run one subtask's action and send its result or error; `control` brings cancel and model replies."""
    run_with_control(channel, image, function, spec, SubtaskControl(channel, control))


def run_with_control(
    channel: _Channel,
    image: dict[str, Any],
    function: Callable[..., Any],
    spec: dict[str, Any],
    control: SubtaskControl,
) -> None:
    """`_run_subtask` with its control stream already set up (an executor's spare, or a shared
    executor, which reads the same stream between subtasks)."""
    from edgefleet.plugin_context import PluginContext

    workspace = Path(spec["workspace"])
    _enter_workspace(workspace)
    ctx = PluginContext(
        job_id=spec["job_id"],
        subtask_id=spec["subtask_id"],
        attempt=spec["attempt"],
        workspace=workspace,
        deadline=time.monotonic() + float(spec["timeout"]),
        is_cancelled=control.is_cancelled,
        report_progress=lambda f, m: channel.send(protocol.progress(f, m)),
        save_checkpoint=lambda state: channel.send(protocol.checkpoint(state)),
        checkpoint=spec.get("checkpoint"),
        model_call=control.models.call,
    )
    try:
        output = function(ctx, spec["action"], spec["args"])
        size = len(json.dumps(output))
        if size > int(image.get("max_output_bytes", 1 << 20)):
            raise OutputTooLarge(
                f"output is {size // 1024} KiB, over the {int(image['max_output_bytes']) // 1024} KiB limit; "
                "write large results to files in the workspace and return their names"
            )
    except BaseException as exc:
        import traceback

        from edgefleet.plugin_context import SubtaskCancelled

        kind: protocol.ErrorKind = "cancelled" if isinstance(exc, SubtaskCancelled) else "exception"
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        channel.send(protocol.error(kind, detail, timed_out=getattr(exc, "timed_out", False)))
        return
    channel.send(protocol.result(output))


def main() -> None:
    _drop_privileges()
    _die_with_parent()  # after the uid switch, which clears the parent-death signal
    # Keep the protocol stream for ourselves; everything else printed goes to stderr.
    channel = _Channel(os.fdopen(os.dup(1), "w", encoding="utf-8"))
    os.dup2(2, 1)
    stdin = _Lines(0)
    image = json.loads(stdin.next())
    setup_error = ""
    function: Callable[..., Any] = _no_plugin
    try:
        function = _prepare(image)
    except BaseException as exc:
        setup_error = f"{type(exc).__name__}: {exc}"
    if image.get("serve") == "many":
        from edgefleet.workers.sandbox_zygote import serve

        serve(stdin, channel, image, function, setup_error)
        return
    line = stdin.next()
    if not line:
        return  # a warm launcher the worker discarded without work
    spec = json.loads(line)
    if setup_error:
        channel.send(protocol.error("setup", setup_error))
        return
    _run_subtask(channel, image, function, spec, stdin)


def _no_plugin(*_args: Any) -> None:
    raise RuntimeError("the plugin could not be imported")


def _exit_now() -> None:
    """Skip the interpreter's teardown (several ms): the parent waits for this process's end,
    and a one-shot launcher has nothing to clean up that the kernel does not."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


if __name__ == "__main__":
    main()
    _exit_now()
