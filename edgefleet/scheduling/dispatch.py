"""Moves ready subtasks from the job store's backlog into Celery queues."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery

from edgefleet.celery_app import EXPRESS_SUFFIX, MESSAGE_PRIORITY, RUN_SUBTASK, node_queue
from edgefleet.scheduling.affinity import ModelAffinity
from edgefleet.scheduling.state import Released, SchedulerState
from edgefleet.schemas import ResourceClass
from edgefleet.settings import Settings
from edgefleet.store.attempts import Claim, Claimant, Completion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Taken:
    """What a free slot took: claimed already (`claim`), or left for it to claim."""

    item: Released
    claim: Claim | None


class Dispatcher:
    """Release is two steps (pop in Lua, then send): a crash in between leaves the
    subtask in the store's `dispatching` set, which the reaper puts back.

    Three callers release: the leader router's release loop (the only one that
    drains retries and whatever waited for room), the submit handler (its new
    job's first subtasks) and a worker that just finished a subtask (refilling the
    slot it freed). All three pop the lowest scores with the same atomic `RELEASE`
    script, which reads the class's target depth from Redis (the settings value is
    only the default), so the target depth and the priority order hold whoever
    releases; the fast paths only save the loop's latency. A worker slot that just
    ended may also `take` its own next subtask, with the same release code."""

    def __init__(
        self, scheduler: SchedulerState, celery: Celery, settings: Settings, affinity: ModelAffinity | None = None
    ) -> None:
        self.scheduler = scheduler
        self.celery = celery
        self.settings = settings
        self.affinity = affinity

    def release(self, resource_class: ResourceClass, max_count: int = 256, freed_on: str | None = None) -> int:
        """`freed_on`: the node whose subtask just ended (a worker's fast path): it has a slot free
        that its last heartbeat does not show yet, which locality may count on."""
        return len(self.release_items(resource_class, max_count, freed_on))

    def release_items(
        self, resource_class: ResourceClass, max_count: int = 256, freed_on: str | None = None
    ) -> list[Released]:
        """As `release`, returning what was sent (the submit path tells its new job's queued steps)."""
        target = self.settings.target_depth.get(resource_class, 16)
        released = self.scheduler.release(resource_class, max_count, target)
        if not released:
            return []
        if self.affinity is not None:
            held = self.affinity.inputs_held(
                [item.envelope for item in released], [item.has_inputs for item in released]
            )
            released = [
                self._with_affinity(item, inputs, freed_on) for item, inputs in zip(released, held, strict=True)
            ]
        self._send(released)
        self.scheduler.mark_dispatched(released)
        return released

    def take(self, resource_class: ResourceClass, claimant: Claimant) -> Taken | None:
        """The class's next ready subtask for a slot of `claimant.node` that is free now, popped
        in the release order (priority, fairness, the batch share) but past the target depth
        (it never waits in a queue), and claimed in the same store call, unless where it runs
        is for locality to decide (it reads input artifacts, or wants a model): then it is
        placed here, and returned unclaimed if it stays on this box (the caller claims it as
        it would a delivery; until then it is in the `dispatching` set the reaper watches), or
        sent to its box and None returned, as for one pinned to another box."""
        taken = self.scheduler.take(resource_class, claimant, self._placed_plugins())
        return self._settle(resource_class, claimant, taken)

    def wait_for_work(self, resource_class: ResourceClass, timeout: float) -> bool:
        """For a slot whose take found nothing while it had time left: see SchedulerState.wait_for_work."""
        return self.scheduler.wait_for_work(resource_class, timeout)

    def complete_and_take(
        self, completion: Sequence[Any], resource_class: ResourceClass, claimant: Claimant
    ) -> tuple[Completion, Taken | None]:
        """An attempt's end (`completion_argv`'s list) and then `take`, in one store call."""
        done, taken = self.scheduler.complete_and_take(completion, resource_class, claimant, self._placed_plugins())
        return done, self._settle(resource_class, claimant, taken)

    def _placed_plugins(self) -> list[str]:
        return self.affinity.placed_plugins() if self.affinity is not None else []

    def _settle(
        self, resource_class: ResourceClass, claimant: Claimant, taken: tuple[Released, Claim | None] | None
    ) -> Taken | None:
        """What a take popped: claimed (done), or placed here and then left to the caller or sent."""
        if taken is None:
            return None
        item, claim = taken
        if claim is not None:
            return Taken(item, claim)
        if self.affinity is not None:
            (held,) = self.affinity.inputs_held([item.envelope], [item.has_inputs])
            item = self._with_affinity(item, held, freed_on=claimant.node)
        if item.queue.removesuffix(EXPRESS_SUFFIX) in (
            resource_class.value,
            f"{node_queue(claimant.node)}.{resource_class.value}",
        ):
            return Taken(item, None)
        self._send([item])
        self.scheduler.mark_dispatched([item])
        return None

    def release_all(self, max_count: int = 256) -> int:
        return sum(self.release(rc, max_count) for rc in ResourceClass)

    def _with_affinity(self, item: Released, held: dict[str, int], freed_on: str | None = None) -> Released:
        express = item.queue.endswith(EXPRESS_SUFFIX)
        if item.queue.removesuffix(EXPRESS_SUFFIX) != item.envelope.resource_class.value:
            return item  # pinned to a node by the step itself
        assert self.affinity is not None
        placement = self.affinity.place(item.envelope, held, freed_on)
        if placement is None:
            return item
        if placement.queue is None:
            self.scheduler.set_queue(item.envelope, item.queue, placement=placement.reason)
            return item
        queue = placement.queue + (EXPRESS_SUFFIX if express else "")
        self.scheduler.set_queue(item.envelope, queue, placement=placement.reason)
        return Released(envelope=item.envelope, queue=queue, has_inputs=item.has_inputs)

    def _send(self, released: list[Released]) -> None:
        # kombu's publish batch: the messages of one release go out in one pipeline (one round
        # trip) instead of one Redis client and round trip per message.
        with self.celery.producer_or_acquire() as producer, producer.batch(max_size=max(1, len(released))):
            for item in released:
                env = item.envelope
                self.celery.send_task(
                    RUN_SUBTASK,
                    kwargs={"envelope": env.model_dump(mode="json")},
                    queue=item.queue,
                    routing_key=item.queue,
                    priority=MESSAGE_PRIORITY[env.priority],
                    producer=producer,
                    # Flower and logs show the plugin action, not the generic task name.
                    shadow=f"{env.plugin}.{env.action}",
                    kwargsrepr=f"{env.job_id[:8]}/{env.subtask_id}#{env.attempt}",
                )
        log.debug("released %d subtasks", len(released))
