"""Child processes of `edgefleet up`: each in its own process group, dying with the supervisor,
logging to a file; the secret files they read; the sweep that leaves nothing behind."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from edgefleet.private_files import write_private

PR_SET_PDEATHSIG = 1


def project_root() -> Path | None:
    """The source checkout this package is imported from, if any (children need it importable)."""
    root = Path(__file__).resolve().parents[2]  # edgefleet/cli/processes.py -> the checkout
    return root if (root / "pyproject.toml").exists() and (root / "router").is_dir() else None


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def child_preexec(parent_pid: int) -> Callable[[], None]:
    """Runs in the forked child before exec: die (SIGTERM) with this supervisor."""
    libc = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            libc = None

    def setup() -> None:
        if libc is not None:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)

    return setup


def write_secret_file(path: Path, value: str) -> None:
    """Write `value` (one line) to `path` readable by its owner only (0600), replacing it atomically."""
    write_private(path, value + "\n")


@dataclass
class Child:
    """One child process and the log file its output goes to."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def sweep_group(pgid: int) -> None:
    """Kill whatever is left in a stopped child's process group (a safety net)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def popen_kwargs() -> dict[str, Any]:
    """Own process group (the terminal's Ctrl-C reaches only the supervisor, which stops children
    in order) and SIGTERM should the supervisor die."""
    return {"process_group": 0, "preexec_fn": child_preexec(os.getpid())}


def spawn(name: str, cmd: list[str], env: dict[str, str], cwd: Path, log_dir: Path) -> Child:
    """Start `cmd` with stdout and stderr appended to `<log_dir>/<name>.log`."""
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")  # noqa: SIM115 - closed when the child is stopped
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=str(cwd),
        **popen_kwargs(),
    )
    return Child(name=name, proc=proc, log_path=log_path, log_file=log_file)


@dataclass
class RestartBackoff:
    """Delays between restarts of a side service: doubling from `first` up to `cap`, and back to
    `first` once a run lasted `stable` seconds (a service that crashes at once is not restarted in a
    tight loop; one that failed after an hour is restarted quickly)."""

    first: float = 1.0
    cap: float = 60.0
    stable: float = 60.0
    _next: float = 0.0

    def delay_after(self, ran_for: float) -> float:
        if self._next <= 0 or ran_for >= self.stable:
            self._next = self.first
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay
