"""The worker's fast-path release, off the subtask's own path.

When a subtask ends, what became ready (its dependents, and backlog room its slot freed) is
released at once rather than at the router's next release round. Done inline, that release
(a script call and a publish) sat between the subtask's result and the slot's next claim, a
third of the gap between two short subtasks. A thread per worker process does it instead, and
requests that arrive while it works are merged: one release per class fills every slot freed
meanwhile (a release sends as much as the class's target depth has room for).

A request that a dying process never got to is not lost work: the router's release loop (the
safety net) releases the same backlog within `release_interval`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from edgefleet.scheduling.dispatch import Dispatcher
from edgefleet.schemas import ResourceClass

log = logging.getLogger(__name__)


class Refiller:
    def __init__(self, dispatcher: Dispatcher, node: str) -> None:
        self.dispatcher = dispatcher
        self.node = node
        self._wanted: set[ResourceClass] = set()
        self._busy = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def request(self, classes: Iterable[ResourceClass]) -> None:
        """Release these classes' ready work soon (returns at once)."""
        classes = set(classes)
        if not classes:
            return
        with self._changed:
            self._wanted |= classes
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="refill", daemon=True)
                self._thread.start()
            self._changed.notify()

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is requested or being released (tests, and a worker shutting down)."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._wanted and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._wanted))
                classes, self._wanted = self._wanted, set()
                self._busy = True
            try:
                for resource_class in sorted(classes):
                    try:
                        self.dispatcher.release(resource_class, freed_on=self.node)
                    except Exception:
                        log.exception("fast-path release failed", extra={"resource_class": resource_class.value})
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()
