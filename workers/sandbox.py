"""The sandbox's parent side: start a plugin in a limited child process and watch it.

Isolation, strongest available first:
- `bwrap` (bubblewrap): new namespaces (`--unshare-all`; the network only with the
  `network` permission), a read-only view of just the system and Python (the whole
  file system read-only with `file_system_read`, writable with `file_system_write`),
  the job's directory read-only and the subtask's workspace writable.
- always, also without bwrap: rlimits (memory, CPU time, file size, processes), a
  scrubbed environment, its own session and process group, a seccomp filter that
  denies process creation without `subprocess` and IP sockets without `network`,
  and a wall-clock deadline after which the whole group is killed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

import edgefleet
import workers
from edgefleet.plugin_manifest import Limits, Permission

if TYPE_CHECKING:
    from edgefleet.plugin_catalog import LoadedPlugin

log = logging.getLogger(__name__)

STDERR_KEEP = 4000
LAUNCHER_SCRIPT = Path(__file__).resolve().parent / "sandbox_launcher.py"
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc")
# What a scrubbed environment keeps: enough for Python, locale and tools to work.
ENV_KEEP = ("PATH", "LANG", "LC_ALL", "TZ")


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


@dataclass(frozen=True)
class PluginImage:
    """What a launcher prepares before it knows its subtask: it depends on the manifest only,
    so a launcher can be started (limits, seccomp, plugin imported) ahead of the work."""

    plugin: str
    folder: Path
    entry_point: str
    permissions: tuple[Permission, ...]
    limits: Limits

    def prepare_message(self) -> dict[str, Any]:
        return {
            "type": "prepare",
            "plugin": self.plugin,
            "folder": str(self.folder),
            "entry_point": self.entry_point,
            "permissions": sorted(p.value for p in self.permissions),
            "limits": self.limits.model_dump(),
        }

    @classmethod
    def of(cls, plugin: LoadedPlugin) -> PluginImage:
        manifest = plugin.manifest
        return cls(
            plugin=manifest.name,
            folder=plugin.folder,
            entry_point=manifest.entry_point,
            permissions=tuple(manifest.permissions),
            limits=manifest.limits,
        )

    @cached_property
    def key(self) -> str:
        """Identifies launchers that are interchangeable (the warm pool's key)."""
        return json.dumps(self.prepare_message(), sort_keys=True)

    @property
    def sees_whole_file_system(self) -> bool:
        return bool({Permission.file_system_read, Permission.file_system_write} & set(self.permissions))


@dataclass
class LaunchSpec:
    image: PluginImage
    action: str
    args: dict[str, Any]
    job_id: str
    subtask_id: str
    attempt: int
    workspace: Path
    job_dir: Path
    timeout: float
    checkpoint: Any = None

    def run_message(self) -> dict[str, Any]:
        return {
            "type": "run",
            "action": self.action,
            "args": self.args,
            "job_id": self.job_id,
            "subtask_id": self.subtask_id,
            "attempt": self.attempt,
            "workspace": str(self.workspace),
            "timeout": self.timeout,
            "checkpoint": self.checkpoint,
        }


@dataclass
class SandboxOutcome:
    outcome: str  # succeeded | failed | cancelled | timeout
    output: Any = None
    error: str = ""
    retryable: bool = True
    isolation: str = ""
    cpu_seconds: float = 0.0
    max_rss_mb: float = 0.0


def _code_roots() -> list[Path]:
    """Where the launcher's own imports live: the edgefleet and workers packages' parents."""
    roots = {Path(edgefleet.__file__).resolve().parent.parent, Path(workers.__file__).resolve().parent.parent}
    return sorted(roots)


def _import_path() -> list[str]:
    entries = [str(p) for p in _code_roots()]
    for entry in sys.path:
        if entry and Path(entry).is_dir() and entry not in entries:
            entries.append(entry)
    return entries


def _python_roots() -> list[Path]:
    roots = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), Path(sys.executable).resolve().parent}
    return sorted(roots)


def child_env(home: Path) -> dict[str, str]:
    """The launcher's scrubbed environment; HOME and TMPDIR move to the workspace when its run arrives."""
    env = {k: os.environ[k] for k in ENV_KEEP if k in os.environ}
    env.update(
        {
            "HOME": str(home),
            "TMPDIR": str(home),
            # With `-S` the child skips site's .pth processing (tens of ms per start, and code
            # we did not choose); it gets exactly our import path instead.
            "PYTHONPATH": os.pathsep.join(_import_path()),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            # One thread per numeric library: threads count against the process limit.
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
        }
    )
    return env


def bwrap_command(image: PluginImage, bwrap: str, workspace: Path, readable: Sequence[Path]) -> list[str]:
    """The namespace view: `workspace` writable, `readable` (the job's folder and the folders
    its earlier steps wrote) read-only, plus the system and Python, unless the manifest asks for more."""
    perms = set(image.permissions)
    cmd = [bwrap, "--die-with-parent", "--new-session", "--unshare-all"]
    if Permission.network in perms:
        cmd.append("--share-net")
    if Permission.file_system_write in perms:
        cmd += ["--bind", "/", "/"]
    elif Permission.file_system_read in perms:
        cmd += ["--ro-bind", "/", "/"]
    else:
        for directory in SYSTEM_DIRS:
            cmd += ["--ro-bind-try", directory, directory]
        for root in [*_python_roots(), *_code_roots(), image.folder.resolve()]:
            cmd += ["--ro-bind", str(root), str(root)]
        for path in readable:
            cmd += ["--ro-bind", str(path), str(path)]
    cmd += ["--dev", "/dev", "--proc", "/proc"]
    if Permission.gpu_access in perms:
        for device in sorted(Path("/dev").glob("nvidia*")) + [Path("/dev/dri")]:
            if device.exists():
                cmd += ["--dev-bind", str(device), str(device)]
    cmd += ["--bind", str(workspace), str(workspace), "--chdir", str(workspace)]
    return cmd


class LauncherProcess:
    """A sandboxed launcher started for one plugin image: limited, filtered and with the
    plugin imported, it waits on stdin for the one subtask it will run, then exits.

    `home` is its writable workspace under bwrap (and its first working directory in
    any case); `readable` is what it may read besides the system and Python.
    """

    def __init__(self, image: PluginImage, *, bwrap: str | None, home: Path, readable: Sequence[Path] = ()) -> None:
        self.image = image
        self.home = home
        self.bwrap = bwrap
        self.isolation = "bwrap+seccomp+rlimits" if bwrap else "seccomp+rlimits"
        # -P: the script's folder (workers/) must not shadow modules; a path, not -m: runpy costs ~7 ms.
        launcher = [sys.executable, "-S", "-P", str(LAUNCHER_SCRIPT)]
        cmd = (bwrap_command(image, bwrap, home, readable) + ["--"] + launcher) if bwrap else launcher
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**child_env(home), "EDGEFLEET_SANDBOX": "bwrap" if bwrap else "process"},
            cwd=str(home),
            text=True,
            start_new_session=True,  # its own process group: one signal reaches all it started
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(image.prepare_message()) + "\n")
        self.proc.stdin.flush()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL its whole process group (everything the plugin started) and reap it."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def discard(self) -> None:
        """Kill a launcher that will not run anything and close its pipes."""
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream:
                try:
                    stream.close()
                except OSError:
                    pass


class SandboxedRun:
    """One attempt in a launcher process. Callbacks run on a reader thread."""

    def __init__(
        self,
        spec: LaunchSpec,
        launcher: LauncherProcess,
        *,
        on_progress: Callable[[float, str], None],
        on_checkpoint: Callable[[Any], None],
        on_model_call: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        kill_grace: float = 3.0,
    ) -> None:
        self.spec = spec
        self.on_progress = on_progress
        self.on_checkpoint = on_checkpoint
        self.on_model_call = on_model_call
        self._stdin_lock = threading.Lock()
        self.kill_grace = kill_grace
        self.isolation = launcher.isolation
        self._launcher = launcher
        self._final: dict[str, Any] | None = None
        self._stderr: list[str] = []
        self._proc: subprocess.Popen[str] = launcher.proc
        self._cpu = 0.0
        self._rss = 0
        self._reader: threading.Thread | None = None
        self._stop_requested: str | None = None

    def start(self) -> None:
        (self.spec.workspace / ".tmp").mkdir(parents=True, exist_ok=True)
        self._write(self.spec.run_message())
        self._reader = threading.Thread(target=self._read_protocol, daemon=True)
        self._reader.start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_protocol(self) -> None:
        assert self._proc.stdout
        for line in self._proc.stdout:
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind = message.get("type")
            if kind == "progress":
                self.on_progress(float(message["fraction"]), str(message.get("message", "")))
            elif kind == "checkpoint":
                self.on_checkpoint(message.get("state"))
            elif kind == "model_call":
                threading.Thread(target=self._answer_model_call, args=(message,), daemon=True).start()
            elif kind in ("result", "error"):
                self._final = message

    def _answer_model_call(self, message: dict[str, Any]) -> None:
        call_id = message.pop("id")
        message.pop("type")
        if self.on_model_call is None:
            reply = {"ok": False, "error": "this worker has no model layer"}
        else:
            reply = self.on_model_call(message)
        self._write({"type": "model_reply", "id": call_id, **reply})

    def _write(self, message: dict[str, Any]) -> None:
        if not self._proc.stdin:
            return
        with self._stdin_lock:
            try:
                self._proc.stdin.write(json.dumps(message) + "\n")
                self._proc.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass  # the plugin is gone; nothing to tell it

    def _read_stderr(self) -> None:
        assert self._proc.stderr
        for line in self._proc.stderr:
            self._stderr.append(line)
            if len(self._stderr) > 200:
                del self._stderr[:100]

    def running(self) -> bool:
        return self._proc.poll() is None

    def sample(self) -> None:
        """CPU seconds and peak RSS of the whole process tree, for the subtask's record."""
        try:
            root = psutil.Process(self._proc.pid)
            tree = [root, *root.children(recursive=True)]
            cpu = rss = 0.0
            for proc in tree:
                with proc.oneshot():
                    times = proc.cpu_times()
                    cpu += times.user + times.system + times.children_user + times.children_system
                    rss += proc.memory_info().rss
            self._cpu = max(self._cpu, cpu)
            self._rss = max(self._rss, int(rss))
        except psutil.Error:
            pass

    def wait(self, timeout: float) -> bool:
        """True once the launcher has exited. Waits on the protocol stream's end first:
        Popen.wait(timeout) polls with a back-off of up to 50 ms, a third of a short subtask."""
        deadline = time.monotonic() + timeout
        if self._reader is not None:
            self._reader.join(timeout)
            if self._reader.is_alive():
                return False
        try:
            self._proc.wait(max(0.0, deadline - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self, reason: str) -> None:
        """Ask the plugin to stop; kill its whole group if it does not within the grace time."""
        self._stop_requested = reason
        if not self.running():
            return
        self._write({"type": "cancel"})
        if not self.wait(self.kill_grace):
            self.kill()

    def kill(self) -> None:
        self._launcher.kill()

    def outcome(self) -> SandboxOutcome:
        if self._reader:
            self._reader.join(5)
        base = {"isolation": self.isolation, "cpu_seconds": round(self._cpu, 3), "max_rss_mb": round(self._rss / 2**20, 1)}
        final = self._final
        if self._stop_requested == "timeout":
            return SandboxOutcome("timeout", error=f"timed out after {self.spec.timeout:g} s", **base)
        if self._stop_requested == "cancelled":
            return SandboxOutcome("cancelled", error="cancelled", **base)
        if final and final["type"] == "result":
            return SandboxOutcome("succeeded", output=final.get("output"), **base)
        if final and final["type"] == "error":
            if final.get("kind") == "cancelled":
                outcome = "timeout" if final.get("timed_out") else "cancelled"
                return SandboxOutcome(outcome, error=final["error"], **base)
            retryable = final.get("kind") != "setup"
            return SandboxOutcome("failed", error=final["error"], retryable=retryable, **base)
        return SandboxOutcome("failed", error=self._death_reason(), **base)

    def _death_reason(self) -> str:
        code = self._proc.returncode
        tail = "".join(self._stderr)[-STDERR_KEEP:].strip()
        suffix = f": {tail}" if tail else ""
        # bwrap reports a child killed by a signal as exit code 128 + signal.
        signum = -code if code is not None and code < 0 else None
        if signum is None and self._launcher.bwrap and code is not None and code > 128:
            signum = code - 128
        if signum is None:
            return f"sandboxed plugin exited with code {code} without a result{suffix}"
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        why = {
            "SIGXCPU": f"exceeded its CPU time limit ({self.spec.image.limits.cpu_seconds} s)",
            "SIGKILL": "was killed (its CPU or memory limit, or the kill of its group)",
            "SIGXFSZ": f"wrote a file over its size limit ({self.spec.image.limits.max_file_mb} MB)",
        }.get(name, f"died of {name}")
        return f"sandboxed plugin {why}{suffix}"
