"""Firing schedules: the leading router claims each due fire time in Redis, then makes its job.

Exactly once per fire time: a fire time is claimed by `schedule_claim.lua`, which moves the
schedule's `next_at` only if it is still the one this router read, so of several routers (or
a router and its restarted self) one claims it. The job is then made through the job
submission with the idempotency key `schedule:<id>:<fire ms>`; a router that dies between
claim and job leaves the claim pending, and the next tick (on whichever router leads)
submits it again under the same key, which finds the job if it was made. Fire times found
more than `grace_s` late (the routers were down) are missed: `run_once` makes one job (the
latest of them, reason `catch_up`), `skip` makes none; both are recorded as one range.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial

from redis.exceptions import RedisError

from edgefleet.router.schedule_times import ScheduleClock
from edgefleet.router.submission import Accepted, SubmissionError, Submitter
from edgefleet.schedule_schemas import MissedPolicy, ScheduleRequest
from edgefleet.settings import Settings
from edgefleet.store.schedules import Claim, ScheduleStore, StoredSchedule

log = logging.getLogger(__name__)

MISSED_COUNT_CAP = 1000  # cron fire times counted one by one in a missed range, at most (~1 ms each)
STEPS_PER_TICK = 100  # fire times one schedule may advance by in one tick (a slow tick catches up the next)
NAME_MAX = 200


def idempotency_key(schedule_id: str, fire_ms: int) -> str:
    return f"schedule:{schedule_id}:{fire_ms}"


def job_name(spec: ScheduleRequest, schedule_id: str, clock: ScheduleClock, fire_ms: int) -> str:
    base = spec.job.name or spec.name or f"schedule-{schedule_id[:8]}"
    suffix = f"@{clock.local(fire_ms)}"
    return base[: NAME_MAX - len(suffix)] + suffix


class ScheduleFirer:
    def __init__(self, store: ScheduleStore, submitter: Submitter, settings: Settings) -> None:
        self.store = store
        self.submitter = submitter
        self.settings = settings

    def tick(self) -> int:
        """Finish pending claims, then fire what is due; the number of jobs made."""
        made = 0
        for schedule_id, fire_ms in self.store.pending():
            made += self._isolated(schedule_id, partial(self.make_job, schedule_id, fire_ms))
        now = self.store.now_ms()
        for schedule_id in self.store.due(now):
            made += self._isolated(schedule_id, partial(self.advance, schedule_id, now))
        return made

    @staticmethod
    def _isolated(schedule_id: str, step: Callable[[], int]) -> int:
        """One schedule's failure (a cron expression croniter cannot follow any further, a broker
        that refused the release) must not hold up the others; a claim left pending is tried
        again next tick under the same idempotency key."""
        try:
            return step()
        except RedisError:
            raise  # the store is gone for every schedule: the loop backs off
        except Exception:
            log.exception("schedule step failed; tried again next tick", extra={"schedule": schedule_id})
            return 0

    def advance(self, schedule_id: str, now: int) -> int:
        stored = self.store.get(schedule_id)
        if stored is None or stored.state != "active":
            return 0
        spec = ScheduleRequest.model_validate_json(stored.spec)
        clock = ScheduleClock.of(schedule_id, spec)
        grace = round(spec.grace_s * 1000)
        keep = self.settings.schedule_keep_runs
        expected, made = stored.next_at, 0
        for _ in range(STEPS_PER_TICK):
            due = clock.due_at(expected)
            if due > now:
                break
            if now - due <= grace:
                following = clock.following(expected)
                claim = self.store.claim_fire(
                    schedule_id, expected, expected, "", following, clock.due_at(following), keep
                )
                made += self._made(claim, stored, spec, clock, expected)
            else:
                last = self._last_missed(clock, now - grace)
                following = clock.following(last)
                count = clock.count_between(expected, last, MISSED_COUNT_CAP)
                if spec.missed is MissedPolicy.run_once:
                    claim = self._run_once(schedule_id, expected, last, count, clock, keep)
                    made += self._made(claim, stored, spec, clock, last)
                else:
                    claim = self.store.skip_missed(
                        schedule_id, expected, expected, last, count, following, clock.due_at(following), keep
                    )
                if claim.verdict in ("skip", "fire", "overlap"):
                    log.info(
                        "missed fire times",
                        extra={"schedule": schedule_id, "count": count, "policy": spec.missed.value},
                    )
            if claim.verdict in ("paused", "gone") or claim.next_at is None:
                break
            # `moved`: another router (or an earlier tick) got there first; go on from where it left it.
            expected = claim.next_at
        return made

    @staticmethod
    def _last_missed(clock: ScheduleClock, cutoff: int) -> int:
        """The last fire time due before `cutoff` (jitter is less than a gap: one step back at most)."""
        last = clock.previous(cutoff)
        while clock.due_at(last) >= cutoff:
            last = clock.previous(last)
        return last

    def _run_once(
        self, schedule_id: str, expected: int, last: int, count: int, clock: ScheduleClock, keep: int
    ) -> Claim:
        """One job for a missed range: the others are recorded as skipped, the latest is claimed."""
        if count > 1:
            before = clock.previous(last)
            skipped = self.store.skip_missed(
                schedule_id, expected, expected, before, count - 1, last, clock.due_at(last), keep
            )
            if skipped.verdict != "skip":
                return skipped
            expected = last
        following = clock.following(last)
        return self.store.claim_fire(schedule_id, expected, last, "catch_up", following, clock.due_at(following), keep)

    def _made(
        self, claim: Claim, stored: StoredSchedule, spec: ScheduleRequest, clock: ScheduleClock, fire: int
    ) -> int:
        if claim.verdict != "fire":
            return 0
        return self._submit(stored, spec, clock, fire)

    def make_job(self, schedule_id: str, fire_ms: int) -> int:
        """The job of a claimed fire time (again, after a router died: its idempotency key finds it)."""
        stored = self.store.get(schedule_id)
        if stored is None:
            self.store.record(schedule_id, fire_ms, None, "the schedule was deleted")
            return 0
        spec = ScheduleRequest.model_validate_json(stored.spec)
        return self._submit(stored, spec, ScheduleClock.of(schedule_id, spec), fire_ms)

    def _submit(self, stored: StoredSchedule, spec: ScheduleRequest, clock: ScheduleClock, fire_ms: int) -> int:
        request = spec.job.model_copy(update={"name": job_name(spec, stored.id, clock, fire_ms)})
        key = idempotency_key(stored.id, fire_ms)
        try:
            # The job submission is async (for HTTP); this loop runs in its own thread.
            outcome = asyncio.run(self.submitter.submit(request, stored.tenant, key))
        except SubmissionError as exc:
            log.warning("scheduled job refused", extra={"schedule": stored.id, "fire_ms": fire_ms, "error": str(exc)})
            self.store.record(stored.id, fire_ms, None, str(exc))
            return 0
        if not isinstance(outcome, Accepted):  # a dry run: never stored in a schedule
            raise RuntimeError(f"schedule {stored.id}: its job is a dry run")
        self.store.record(stored.id, fire_ms, outcome.status.id)
        return 1 if outcome.created else 0
