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
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any
from collections.abc import Callable

MB = 1024 * 1024


class _Channel:
    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


def _set_limits(limits: dict[str, Any], allow_subprocess: bool) -> None:
    memory = int(limits["memory_mb"]) * MB
    cpu = int(limits["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # The soft limit sends SIGXCPU, the hard one SIGKILL a moment later.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 2))
    size = int(limits["max_file_mb"]) * MB
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if allow_subprocess:
        processes = int(limits["max_processes"])
        resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))


class _ModelCalls:
    """ctx.model(...) calls: the worker process holds the warm models and makes the call."""

    def __init__(self, channel: _Channel, cancelled: threading.Event) -> None:
        self._channel = channel
        self._cancelled = cancelled
        self._lock = threading.Lock()
        self._next = 0
        self._waiting: dict[int, tuple[threading.Event, list[dict[str, Any]]]] = {}

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._next += 1
            call_id = self._next
            done, box = threading.Event(), []
            self._waiting[call_id] = (done, box)
        self._channel.send({"type": "model_call", "id": call_id, **request})
        while not done.wait(0.2):
            if self._cancelled.is_set():
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


def _prepare(image: dict[str, Any]) -> Callable[..., Any]:
    """Limit this process and import the plugin: everything that depends on the manifest only."""
    permissions = set(image["permissions"])
    _set_limits(image["limits"], "subprocess" in permissions)
    from workers.seccomp_filter import install

    install(allow_subprocess="subprocess" in permissions, allow_network="network" in permissions)
    from edgefleet.plugin_context import PluginContext  # noqa: F401 - imported now, not on the subtask's time
    from edgefleet.plugin_loader import load_entry_point

    sys.path.insert(0, image["folder"])  # plugins written as flat modules import siblings directly
    return load_entry_point(image["plugin"], Path(image["folder"]), image["entry_point"])


def _enter_workspace(workspace: Path) -> None:
    os.chdir(workspace)
    os.environ["HOME"] = str(workspace)
    os.environ["TMPDIR"] = str(workspace / ".tmp")
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None:
        tempfile.tempdir = None  # the plugin's import may have fixed it to the launcher's first home


def main() -> None:
    _die_with_parent()
    # Keep the protocol stream for ourselves; everything else printed goes to stderr.
    channel = _Channel(os.fdopen(os.dup(1), "w", encoding="utf-8"))
    os.dup2(2, 1)
    image = json.loads(sys.stdin.readline())
    setup_error = ""
    try:
        function = _prepare(image)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the subtask
        setup_error = f"{type(exc).__name__}: {exc}"
    line = sys.stdin.readline()
    if not line:
        return  # a warm launcher the worker discarded without work
    spec = json.loads(line)
    if setup_error:
        channel.send({"type": "error", "kind": "setup", "error": setup_error})
        return
    cancelled = threading.Event()
    models = _ModelCalls(channel, cancelled)

    def read_control() -> None:
        for line in sys.stdin:
            message = json.loads(line)
            if message.get("type") == "cancel":
                cancelled.set()
            elif message.get("type") == "model_reply":
                models.answer(message)
        cancelled.set()  # the parent closed the pipe: it is gone or wants us gone
        models.abandon()

    threading.Thread(target=read_control, daemon=True).start()
    from edgefleet.plugin_context import PluginContext

    workspace = Path(spec["workspace"])
    _enter_workspace(workspace)
    ctx = PluginContext(
        job_id=spec["job_id"],
        subtask_id=spec["subtask_id"],
        attempt=spec["attempt"],
        workspace=workspace,
        deadline=time.monotonic() + float(spec["timeout"]),
        is_cancelled=cancelled.is_set,
        report_progress=lambda f, m: channel.send({"type": "progress", "fraction": f, "message": m}),
        save_checkpoint=lambda state: channel.send({"type": "checkpoint", "state": state}),
        checkpoint=spec.get("checkpoint"),
        model_call=models.call,
    )
    try:
        output = function(ctx, spec["action"], spec["args"])
        json.dumps(output)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes the subtask's error
        import traceback

        from edgefleet.plugin_context import SubtaskCancelled

        kind = "cancelled" if isinstance(exc, SubtaskCancelled) else "exception"
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        channel.send({"type": "error", "kind": kind, "error": detail, "timed_out": getattr(exc, "timed_out", False)})
        return
    channel.send({"type": "result", "output": output})


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
