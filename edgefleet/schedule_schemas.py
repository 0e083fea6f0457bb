"""Schedules at the HTTP boundary: a job body run on a cron expression or an interval.

Only structure is checked here (the core has no cron library): the router checks the cron
expression, the minimum interval and the job itself (router/schedule_times.py, router/schedules.py).
"""

from __future__ import annotations

import zoneinfo
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgefleet.schemas import JobRequest


class OverlapPolicy(str, Enum):
    skip = "skip"  # a fire time is skipped while the schedule's previous job still runs
    allow = "allow"  # every fire time makes a job, whatever still runs


class MissedPolicy(str, Enum):
    run_once = "run_once"  # after downtime, one job for the fire times that were missed
    skip = "skip"  # after downtime, missed fire times make no job


class ScheduleRequest(BaseModel):
    """The body of POST /v1/schedules: a job body and when to run it: exactly one of `cron` or `interval_s`
    (checked by the router, so that the answer names both fields)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=120)
    job: JobRequest = Field(description="a job body as POST /v1/jobs takes it: `steps`, or `template` and `inputs`")
    cron: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="5 fields (minute hour day month weekday), or 6 with seconds last; in `timezone`",
    )
    interval_s: float | None = Field(
        default=None,
        gt=0,
        le=366 * 86400,
        strict=True,
        description="seconds between runs, counted from the Unix epoch (3600 runs on the hour); at least "
        "the router's EDGEFLEET_SCHEDULE_MIN_INTERVAL",
    )
    timezone: str = Field(default="UTC", max_length=64, description="IANA name; cron fields are read in it")
    jitter_s: float = Field(
        default=0.0,
        ge=0,
        le=86400,
        strict=True,
        description="each run starts up to this many seconds late (the same delay on every router), so "
        "schedules with the same time do not all start at once; less than the gap between two runs",
    )
    overlap: OverlapPolicy = Field(
        default=OverlapPolicy.skip, description="skip: no new job while the previous one runs; allow: always"
    )
    missed: MissedPolicy = Field(
        default=MissedPolicy.run_once,
        description="fire times older than `grace_s` when the router gets to them (it was down): run_once "
        "makes one job for them, skip makes none",
    )
    grace_s: float = Field(
        default=60.0,
        ge=0,
        le=7 * 86400,
        strict=True,
        description="a fire time reached at most this late still runs on its own; later, it counts as missed",
    )
    paused: bool = Field(default=False, strict=True, description="create it paused (resume to start)")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except Exception:  # ZoneInfoNotFoundError, ValueError, or an OS error on an odd name
            raise ValueError(f"unknown time zone {value!r} (an IANA name like 'Europe/Berlin' or 'UTC')") from None
        return value


class ScheduleRun(BaseModel):
    """One fire time (or a range of missed ones) and what came of it."""

    fire_at: float = Field(description="the nominal fire time (Unix seconds)")
    state: Literal["pending", "created", "skipped", "failed"] = Field(
        description="pending: claimed, its job being made; created: it has a job; skipped: see reason; "
        "failed: its job was refused (see error)"
    )
    job_id: str | None = Field(
        default=None, description="the job it made (skipped for overlap: the job that still ran)"
    )
    reason: str | None = Field(default=None, description="overlap, missed, or catch_up (the one missed run made)")
    until: float | None = Field(default=None, description="a missed range: the last fire time in it")
    count: int = Field(
        default=1,
        description="fire times this entry stands for (a missed range: more than 1; a cron schedule's "
        "range counts at most 1000)",
    )
    error: str | None = None


class ScheduleStatus(BaseModel):
    id: str
    name: str | None = None
    tenant: str
    state: Literal["active", "paused"]
    job: JobRequest
    cron: str | None = None
    interval_s: float | None = None
    timezone: str
    jitter_s: float
    overlap: OverlapPolicy
    missed: MissedPolicy
    grace_s: float
    created_at: float
    updated_at: float
    next_fire_at: list[float] = Field(
        default_factory=list, description="the next nominal fire times (Unix seconds); empty while paused"
    )
    next_fire_local: list[str] = Field(default_factory=list, description="the same, ISO 8601 in `timezone`")
    fired: int = Field(default=0, description="fire times that made (or are making) a job")
    skipped: int = Field(default=0, description="fire times skipped (overlap, missed)")
    last_runs: list[ScheduleRun] = Field(default_factory=list, description="newest first")


class SchedulePage(BaseModel):
    schedules: list[ScheduleStatus]
