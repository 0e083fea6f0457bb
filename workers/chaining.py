"""Slot chaining: a slot whose subtask just ended takes the next one from the backlog itself.

Through Celery, each subtask costs its slot a hand-off: the pool process reports to its parent,
the parent acks the message, fetches the next one and passes it down, with Redis round trips
and process wake-ups in series. For a short subtask that is as long as the subtask itself. A
slot that is free anyway can instead pop the class's next ready subtask in the release order
(`Dispatcher.take`: the same release code, priorities, fairness and batch share as every
release) and claim it in the same store call, inside the same Celery task. The call that
records a subtask's end does that too (`complete_take.lua`), so a chained subtask costs one
store call besides its lease renewals. (One whose box locality decides, by its input
artifacts or its model, is placed first and claimed after.)

While it chains the slot is one of its class's *takers* (its claims say for how long): releases
keep no Celery message queued for it, so new work waits in the backlog, where the slot takes it
in the release order. When it finds nothing with time left it *lingers*: it blocks on the
class's wake list, which gets a token whenever a subtask is made ready while slots linger, and
takes again; its last take, once the time is up, ends its registration in the same store call
that finds nothing (take_core.lua). An idle slot thus costs a broker round trip only once a
chain's time is up, not per subtask.

Bounds, so that the messages already waiting in the slot's Celery queue (released earlier)
and a warm shutdown wait at most about `chain_seconds`: a chain stops after `chain_max`
subtasks, or once it has run (or lingered) `chain_seconds`, checked before each take (a long
subtask ends its chain). Express slots do not chain: they stay free for interactive work. Nor does any
slot while Celery task events are on: a chained subtask is no Celery task, and Flower would
not list it (`workers.class_worker`).

Crashes: a chained subtask is claimed like a delivered one (a lease, renewed while it runs), so
a pool process killed under it is seen by the node's supervisor, which gives it a new attempt
(or, without one, its lease expires and the reaper does); one popped but not yet claimed stays
in the store's `dispatching` set, which the reaper puts back.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from edgefleet.scheduling.dispatch import Taken
from edgefleet.schemas import ResourceClass
from edgefleet.workers.runner import NextTake, SubtaskRunner
from edgefleet.workers.store_retry import TRANSIENT

log = logging.getLogger(__name__)

# Shortest wait for work worth a blocking call (and Redis reads a BLPOP timeout under 1 ms as 0: forever).
MIN_WAIT = 0.002


class SlotChain:
    def __init__(self, runner: SubtaskRunner, *, max_subtasks: int, seconds: float) -> None:
        self.runner = runner
        self.max_subtasks = max_subtasks
        self.seconds = seconds

    def run(self, envelope: dict[str, Any]) -> str:
        """Run the delivered subtask, then what the slot takes itself; the delivered one's outcome."""
        started = time.monotonic()
        runner = self.runner
        resource_class = ResourceClass(envelope["resource_class"])
        taken = 0

        def room() -> bool:
            return taken < self.max_subtasks and time.monotonic() - started < self.seconds

        # Each completion takes the next subtask in the same store call while the chain has room.
        request = NextTake(resource_class, room, deadline=started + self.seconds)
        runner.next_take = request
        try:
            outcome = runner.run(envelope)
            last = outcome
            while last != "abandoned":  # the store is away: nothing to take
                attempted, got, sent, lingering = request.pop()
                try:
                    if not attempted:
                        if not room():
                            break
                        got, sent, lingering = self._take(request)
                    while got is None and lingering:
                        got, sent, lingering = self._linger(request)
                except TRANSIENT as exc:
                    # Not retried: a take whose reply was lost may have claimed a subtask, which then
                    # waits for its lease to expire (the reaper requeues it as a lost attempt). A
                    # lingering slot's registration runs out with the chain's time.
                    log.warning("could not take the next subtask", extra={"error": type(exc).__name__})
                    break
                if got is None:
                    break
                # (A subtask taken is run, whatever the chain's room by now: it is claimed.)
                taken += 1
                runner.metrics.chained(resource_class.value)
                if got.claim is not None:
                    last = runner.run_claimed(got.item.envelope, got.claim, sent)
                else:
                    last = runner.run_envelope(got.item.envelope)
        finally:
            runner.next_take = None
        return outcome

    def _take(self, request: NextTake, *, last: bool = False) -> tuple[Taken | None, float, bool]:
        """The class's next subtask, taken by this slot: (taken, when the take was sent, whether
        the slot now lingers: it found nothing while it had time left). `last`: the chain's time
        is (as good as) up, and the slot stops being a taker unless it finds one."""
        sent = time.monotonic()
        claimant = self.runner.claimant()  # its takes_for is 0 once the chain's time is up
        if last:
            claimant = dataclasses.replace(claimant, takes_for=0.0)
        got = self.runner.dispatcher.take(request.resource_class, claimant)
        return got, sent, got is None and claimant.takes_for > 0

    def _linger(self, request: NextTake) -> tuple[Taken | None, float, bool]:
        """Wait, until the chain's time is up, for a subtask to be made ready, then take again.
        The last take, with no time left, ends the slot's registration in the same store call
        that finds nothing, so work made ready just before gets its message from the release."""
        left = request.deadline - time.monotonic()
        if left < MIN_WAIT or not request.wanted():
            return self._take(request, last=True)
        self.runner.dispatcher.wait_for_work(request.resource_class, left)
        return self._take(request)
