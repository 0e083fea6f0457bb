"""Which of a class worker's processes (the Celery main process and its pool children) died.

A subtask's lease names the process that runs it (node + pid). When the node's supervisor
sees that process die, the lease can go at once instead of running out (see
`JobStore.lose_processes`), so the subtask runs again in about a second on any box.
"""

from __future__ import annotations

import subprocess

import psutil


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _is_pool_process(child: psutil.Process, parent_cmdline: list[str]) -> bool:
    """A forked pool child keeps its parent's command line (or Celery's title, with
    setproctitle); sandbox launchers and other helpers never run subtasks themselves."""
    try:
        cmdline = child.cmdline()
    except psutil.Error:
        return False
    return cmdline == parent_cmdline or "celeryd" in " ".join(cmdline[:1])


class ProcessWatch:
    """Remembers the processes of one class worker that may own leases."""

    def __init__(self) -> None:
        self.watched: set[int] = set()

    def dead_since_last_look(self, main: subprocess.Popen[bytes] | None) -> list[int]:
        """Processes seen alive before and dead now. A pool child that outlives its main
        process (orphaned, still finishing its subtask) stays watched until it ends."""
        now: set[int] = set()
        if main is not None and main.poll() is None:
            now.add(main.pid)
            try:
                parent = psutil.Process(main.pid)
                parent_cmdline = parent.cmdline()
                now.update(c.pid for c in parent.children() if _is_pool_process(c, parent_cmdline))
            except psutil.Error:
                pass
        gone = self.watched - now
        dead = sorted(pid for pid in gone if not _alive(pid))
        self.watched = now | (gone - set(dead))
        return dead
