"""Schedules as the API sees them: create (checked like a job, without making one), read, pause, resume, delete.

The job body is checked by the job submission itself (`parse_submission`, then a dry run
through `Submitter.submit`), so a schedule is refused for exactly what would refuse its job;
problems name the field inside the schedule's body (`job.template`, `job.steps.0.plugin`).
Firing is `router.schedule_firing`.
"""

from __future__ import annotations

import uuid
from typing import Any

from edgefleet.router.errors import ApiError
from edgefleet.router.schedule_times import ScheduleClock, timing_problems
from edgefleet.router.submission import InvalidPlan, InvalidSubmission, SubmissionError, Submitter, parse_submission
from edgefleet.schedule_schemas import ScheduleRequest, ScheduleRun, ScheduleStatus
from edgefleet.schemas import JobRequest
from edgefleet.settings import Settings
from edgefleet.store.schedules import ScheduleStore, StoredSchedule

NEXT_SHOWN = 5  # next fire times in a schedule's status


def _prefixed(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(f"job.{field}" if field and field != "body" else "job", reason) for field, reason in problems]


def checked_job(spec: ScheduleRequest) -> JobRequest:
    """The schedule's job body through the job submission's own checks, plus what a schedule cannot run."""
    try:
        job = parse_submission(spec.job.model_dump(mode="json", exclude_unset=True), None)
    except SubmissionError as exc:
        raise InvalidSubmission(_prefixed(exc.problems)) from None
    if job.goal is not None:
        # A model would plan it again at every fire time, each time differently (or not at all).
        raise InvalidSubmission(
            [
                (
                    "job.goal",
                    "a schedule runs 'steps' or a 'template'; plan the goal once with dry_run and schedule its steps",
                )
            ]
        )
    if job.dry_run:
        raise InvalidSubmission([("job.dry_run", "a scheduled job cannot be a dry run")])
    return job


def run_of(record: dict[str, Any]) -> ScheduleRun:
    """A run record from the store (times in ms, as strings) as the API shows it."""
    until = record.get("until")
    return ScheduleRun(
        fire_at=int(record["fire_at"]) / 1000,
        state=record["state"],
        job_id=record.get("job_id") or None,
        reason=record.get("reason") or None,
        until=int(until) / 1000 if until else None,
        count=int(record.get("count") or 1),
        error=record.get("error") or None,
    )


class ScheduleService:
    def __init__(self, store: ScheduleStore, submitter: Submitter, settings: Settings) -> None:
        self.store = store
        self.submitter = submitter
        self.settings = settings

    async def create(self, spec: ScheduleRequest, tenant: str) -> ScheduleStatus:
        job = checked_job(spec)
        now = self.store.now_ms()
        try:
            problems = timing_problems(spec, self.settings.schedule_min_interval, now)
        except Exception as exc:  # e.g. a cron expression that never matches a date (croniter gives up)
            problems = [("cron", f"no fire times: {exc}")]
        if problems:
            raise InvalidSubmission(problems)
        try:
            await self.submitter.submit(job.model_copy(update={"dry_run": True}), tenant, None)
        except InvalidPlan as exc:
            raise InvalidPlan(_prefixed(exc.problems)) from None
        except InvalidSubmission as exc:
            raise InvalidSubmission(_prefixed(exc.problems)) from None
        schedule_id = uuid.uuid4().hex
        clock = ScheduleClock.of(schedule_id, spec)
        next_at = clock.following(now)
        stored = spec.model_copy(update={"job": job})
        verdict = self.store.create(
            schedule_id,
            tenant,
            stored.model_dump_json(),
            next_at,
            clock.due_at(next_at),
            spec.paused,
            self.settings.schedule_max_per_tenant,
            spec.overlap.value,
        )
        if verdict == "full":
            raise ApiError(
                409,
                "conflict",
                [
                    (
                        "body",
                        f"tenant {tenant!r} has {self.settings.schedule_max_per_tenant} schedules, the most allowed",
                    )
                ],
            )
        if verdict != "created":  # a uuid4 collision
            raise RuntimeError(f"schedule id {schedule_id} already exists")
        return self.visible(schedule_id, tenant, admin=False)

    def _stored(self, schedule_id: str, tenant: str, admin: bool) -> StoredSchedule:
        """The schedule, if this principal may see it: another tenant's is missing, not forbidden."""
        stored = self.store.get(schedule_id)
        if stored is None or (not admin and stored.tenant != tenant):
            raise ApiError(404, "not_found", [("schedule_id", f"no schedule {schedule_id!r}")])
        return stored

    def visible(self, schedule_id: str, tenant: str, admin: bool, runs: int = 20) -> ScheduleStatus:
        return self.status(self._stored(schedule_id, tenant, admin), runs)

    def status(self, stored: StoredSchedule, runs: int = 20) -> ScheduleStatus:
        spec = ScheduleRequest.model_validate_json(stored.spec)
        clock = ScheduleClock.of(stored.id, spec)
        upcoming = [stored.next_at, *clock.times(stored.next_at, NEXT_SHOWN - 1)] if stored.state == "active" else []
        return ScheduleStatus(
            id=stored.id,
            name=spec.name,
            tenant=stored.tenant,
            state="paused" if stored.state == "paused" else "active",
            job=spec.job,
            cron=spec.cron,
            interval_s=spec.interval_s,
            timezone=spec.timezone,
            jitter_s=spec.jitter_s,
            overlap=spec.overlap,
            missed=spec.missed,
            grace_s=spec.grace_s,
            created_at=stored.created_at,
            updated_at=stored.updated_at,
            next_fire_at=[ms / 1000 for ms in upcoming],
            next_fire_local=[clock.local(ms) for ms in upcoming],
            fired=stored.fired,
            skipped=stored.skipped,
            last_runs=[run_of(r) for r in self.store.runs(stored.id, runs)] if runs else [],
        )

    def list(self, tenant: str | None, limit: int) -> list[ScheduleStatus]:
        found = (self.store.get(schedule_id) for schedule_id in self.store.ids(tenant, limit))
        return [self.status(stored, runs=1) for stored in found if stored is not None]

    def pause(self, schedule_id: str, tenant: str, admin: bool) -> ScheduleStatus:
        self._stored(schedule_id, tenant, admin)
        self.store.pause(schedule_id)
        return self.visible(schedule_id, tenant, admin)

    def resume(self, schedule_id: str, tenant: str, admin: bool) -> ScheduleStatus:
        """Active again; fire times that passed while it was paused are not run."""
        stored = self._stored(schedule_id, tenant, admin)
        clock = ScheduleClock.of(schedule_id, ScheduleRequest.model_validate_json(stored.spec))
        next_at = clock.following(self.store.now_ms())
        self.store.resume(schedule_id, next_at, clock.due_at(next_at))
        return self.visible(schedule_id, tenant, admin)

    def delete(self, schedule_id: str, tenant: str, admin: bool) -> None:
        self._stored(schedule_id, tenant, admin)
        self.store.delete(schedule_id)
