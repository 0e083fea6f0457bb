"""When a schedule fires: its fire times from a cron expression (croniter) or an interval, and its jitter.

Times are integer milliseconds since the epoch. A cron expression is read in the schedule's
time zone (croniter follows its DST changes); an interval counts from the Unix epoch, so
that every router computes the same fire times without storing an anchor. The jitter of a
fire time is derived from the schedule id and that time, so that every router (and a
restarted one) delays it by the same amount.
"""

from __future__ import annotations

import hashlib
import itertools
import zoneinfo
from dataclasses import dataclass
from datetime import datetime

from croniter import croniter

from edgefleet.schedule_schemas import ScheduleRequest

Problem = tuple[str, str]
GAPS_CHECKED = 100  # consecutive cron fire times whose gaps are checked against the minimum interval


@dataclass(frozen=True)
class ScheduleClock:
    schedule_id: str
    cron: str | None
    interval_ms: int | None
    zone: zoneinfo.ZoneInfo
    jitter_ms: int

    @classmethod
    def of(cls, schedule_id: str, spec: ScheduleRequest) -> ScheduleClock:
        return cls(
            schedule_id=schedule_id,
            cron=spec.cron,
            interval_ms=round(spec.interval_s * 1000) if spec.interval_s is not None else None,
            zone=zoneinfo.ZoneInfo(spec.timezone),
            jitter_ms=round(spec.jitter_s * 1000),
        )

    def _at(self, ms: int) -> datetime:
        return datetime.fromtimestamp(ms / 1000, self.zone)

    def following(self, after_ms: int) -> int:
        """The first fire time strictly after `after_ms`."""
        if self.interval_ms is not None:
            return (after_ms // self.interval_ms + 1) * self.interval_ms
        assert self.cron is not None
        return round(croniter(self.cron, self._at(after_ms)).get_next(float) * 1000)

    def previous(self, before_ms: int) -> int:
        """The last fire time strictly before `before_ms`."""
        if self.interval_ms is not None:
            return ((before_ms - 1) // self.interval_ms) * self.interval_ms
        assert self.cron is not None
        return round(croniter(self.cron, self._at(before_ms)).get_prev(float) * 1000)

    def times(self, after_ms: int, count: int) -> list[int]:
        """The `count` fire times after `after_ms`."""
        out: list[int] = []
        current = after_ms
        for _ in range(count):
            current = self.following(current)
            out.append(current)
        return out

    def count_between(self, first: int, last: int, cap: int) -> int:
        """Fire times from `first` to `last` (both fire times), at most `cap` counted for cron."""
        if self.interval_ms is not None:
            return (last - first) // self.interval_ms + 1
        count, current = 1, first
        while current < last and count < cap:
            current = self.following(current)
            count += 1
        return count

    def jitter(self, fire_ms: int) -> int:
        if self.jitter_ms <= 0:
            return 0
        digest = hashlib.sha256(f"{self.schedule_id}:{fire_ms}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % (self.jitter_ms + 1)

    def due_at(self, fire_ms: int) -> int:
        return fire_ms + self.jitter(fire_ms)

    def local(self, fire_ms: int) -> str:
        return self._at(fire_ms).isoformat()


def timing_problems(spec: ScheduleRequest, min_interval_s: float, now_ms: int) -> list[Problem]:
    """What is wrong with the schedule's timing: a cron expression croniter refuses, runs closer
    together than the router's minimum, or a jitter that would reorder runs."""
    if (spec.cron is None) == (spec.interval_s is None):
        reason = "give exactly one of 'cron' or 'interval_s'"
        return [("cron", reason), ("interval_s", reason)]
    if spec.cron is not None:
        try:
            croniter(spec.cron, datetime.fromtimestamp(now_ms / 1000, zoneinfo.ZoneInfo(spec.timezone)))
        except Exception as exc:  # croniter's parser raises more than CroniterError on odd input
            return [("cron", f"not a valid cron expression: {exc}")]
    clock = ScheduleClock.of("check", spec)
    if clock.interval_ms is not None:
        gap_ms = clock.interval_ms
    else:
        times = clock.times(now_ms, GAPS_CHECKED + 1)
        gap_ms = min(b - a for a, b in itertools.pairwise(times))
    field = "interval_s" if spec.interval_s is not None else "cron"
    if gap_ms < min_interval_s * 1000:
        return [(field, f"runs every {gap_ms / 1000:g} s; the router's minimum is {min_interval_s:g} s")]
    if clock.jitter_ms >= gap_ms:
        return [("jitter_s", f"must be less than the gap between two runs ({gap_ms / 1000:g} s)")]
    return []
