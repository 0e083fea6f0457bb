"""Lines from a launcher's protocol pipe, read on the caller's thread with a timeout.

A reader thread per subtask cost more than a short subtask's own work (creating and starting
the thread, its Event and Condition: ~9% of a pool process's Python time in bench_dispatch's
profile). The worker's thread that supervises the run waits on the pipe itself instead. One
reader per launcher: an executor's stream goes on from one run to the next, and bytes read
past a run's last line belong to the next run.
"""

from __future__ import annotations

import math
import os
import select
import time
from enum import Enum

CHUNK = 65536


class PipeEnd(Enum):
    EOF = "eof"  # the writer closed the pipe
    OVERSIZED = "oversized"  # a line over the limit: reading stops there


EOF = PipeEnd.EOF
OVERSIZED = PipeEnd.OVERSIZED


class PipeLines:
    def __init__(self, fd: int, limit: int) -> None:
        """`limit`: the longest line in bytes, its newline not counted; a longer one is reported
        as OVERSIZED (and reading stops there)."""
        self.fd = fd
        self.limit = limit
        self._buffer = bytearray()
        self._eof = False
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)

    def next(self, timeout: float) -> str | PipeEnd | None:
        """The next line (with its newline), None when none came within `timeout` seconds,
        EOF once the writer has closed the pipe (after a last line without a newline, if any)."""
        deadline = time.monotonic() + timeout
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                if end > self.limit:
                    return OVERSIZED
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line.decode("utf-8", errors="replace")
            if len(self._buffer) > self.limit:
                return OVERSIZED
            if self._eof:
                if self._buffer:
                    rest = bytes(self._buffer)
                    self._buffer.clear()
                    return rest.decode("utf-8", errors="replace")
                return EOF
            if not self._poll.poll(max(0, math.ceil((deadline - time.monotonic()) * 1000))):
                if time.monotonic() >= deadline:
                    return None
                continue  # woken early (a signal): wait out the rest
            try:
                chunk = os.read(self.fd, CHUNK)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if chunk:
                self._buffer += chunk
            else:
                self._eof = True
