"""Slot chaining: a slot whose subtask just ended takes the next one from the backlog itself.

Through Celery, each subtask costs its slot a hand-off: the pool process reports to its parent,
the parent acks the message, fetches the next one and passes it down, with Redis round trips
and process wake-ups in series. For a short subtask that is as long as the subtask itself. A
slot that is free anyway can instead pop the class's next ready subtask in the release order
(`Dispatcher.take`: the same script, priorities, fairness and batch share as every release)
and claim it at once, inside the same Celery task.

Bounds, so that the messages already waiting in the slot's Celery queue (released earlier)
and a warm shutdown wait at most about `chain_seconds`: a chain stops after `chain_max`
subtasks, or once it has run `chain_seconds`, checked before each take (a long subtask ends
its chain). Express slots do not chain: they stay free for interactive work.

Crashes: a chained subtask is claimed like a delivered one (a lease, renewed while it runs), so
a pool process killed under it loses it to the lease's expiry and the reaper requeues it; one
popped but not yet claimed stays in the store's `dispatching` set, which the reaper puts back.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from edgefleet.schemas import ResourceClass
from edgefleet.workers.runner import SubtaskRunner
from edgefleet.workers.store_retry import TRANSIENT

log = logging.getLogger(__name__)


class SlotChain:
    def __init__(self, runner: SubtaskRunner, *, max_subtasks: int, seconds: float) -> None:
        self.runner = runner
        self.max_subtasks = max_subtasks
        self.seconds = seconds

    def run(self, envelope: dict[str, Any]) -> str:
        """Run the delivered subtask, then what the slot takes itself; the delivered one's outcome."""
        started = time.monotonic()
        outcome = self.runner.run(envelope)
        if outcome == "abandoned":
            return outcome  # the store is away: nothing to take
        resource_class = ResourceClass(envelope["resource_class"])
        taken = 0
        while taken < self.max_subtasks and time.monotonic() - started < self.seconds:
            try:
                item = self.runner.dispatcher.take(resource_class, self.runner.node)
            except TRANSIENT as exc:
                log.warning("could not take the next subtask", extra={"error": type(exc).__name__})
                break
            if item is None:
                break
            taken += 1
            self.runner.metrics.chained.labels(resource_class.value).inc()
            if self.runner.run_envelope(item.envelope) == "abandoned":
                break
        return outcome
