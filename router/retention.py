"""The router's retention sweep: finished jobs older than the retention are deleted from Redis.

A thread, like the other router loops, because the job store is a blocking client. Each
batch is one Lua script (`edgefleet/store/lua/gc.lua`), so several routers may sweep at once: a job is
deleted by exactly one of them. Workspaces on worker boxes are swept by each node
(`workers.workspace_gc`).
"""

from __future__ import annotations

import logging
import threading

from edgefleet.store import JobStore

log = logging.getLogger(__name__)

BATCH = 500


class RetentionSweeper:
    def __init__(self, store: JobStore, interval: float) -> None:
        self.store = store
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ef-retention", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def sweep(self) -> int:
        """Delete every job past its retention, in batches; the number deleted."""
        removed = 0
        while not self._stop.is_set():
            batch = self.store.gc(limit=BATCH)
            removed += len(batch.removed)
            if batch.remaining <= 0 or not batch.removed:
                break
        return removed

    def _run(self) -> None:
        indexed = False
        while not self._stop.is_set():
            try:
                if not indexed:
                    # Jobs that finished before the finished index existed expire like the others.
                    self.store.index_finished()
                    indexed = True
                removed = self.sweep()
                if removed:
                    log.info("expired finished jobs", extra={"count": removed})
            except Exception:
                log.warning("retention sweep failed; retrying", exc_info=True)
            self._stop.wait(self.interval)
