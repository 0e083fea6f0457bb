"""Slot chaining: a slot whose subtask just ended takes the next one from the backlog itself.

Through Celery, each subtask costs its slot a hand-off: the pool process reports to its parent,
the parent acks the message, fetches the next one and passes it down, with Redis round trips
and process wake-ups in series. For a short subtask that is as long as the subtask itself. A
slot that is free anyway can instead pop the class's next ready subtask in the release order
(`Dispatcher.take`: the same release code, priorities, fairness and batch share as every
release) and claim it in the same store call, inside the same Celery task. (One whose box
locality decides, by its input artifacts or its model, is placed first, and claimed after.)

Bounds, so that the messages already waiting in the slot's Celery queue (released earlier)
and a warm shutdown wait at most about `chain_seconds`: a chain stops after `chain_max`
subtasks, or once it has run `chain_seconds`, checked before each take (a long subtask ends
its chain). Express slots do not chain: they stay free for interactive work.

Crashes: a chained subtask is claimed like a delivered one (a lease, renewed while it runs), so
a pool process killed under it is seen by the node's supervisor, which gives it a new attempt
(or, without one, its lease expires and the reaper does); one popped but not yet claimed stays
in the store's `dispatching` set, which the reaper puts back.
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
            sent = time.monotonic()
            try:
                got = self.runner.dispatcher.take(resource_class, self.runner.claimant())
            except TRANSIENT as exc:
                # Not retried: a take whose reply was lost may have claimed a subtask, which then
                # waits for its lease to expire (the reaper requeues it as a lost attempt).
                log.warning("could not take the next subtask", extra={"error": type(exc).__name__})
                break
            if got is None:
                break
            taken += 1
            self.runner.metrics.chained(resource_class.value)
            if got.claim is not None:
                ended = self.runner.run_claimed(got.item.envelope, got.claim, sent)
            else:
                ended = self.runner.run_envelope(got.item.envelope)
            if ended == "abandoned":
                break
        return outcome
