"""Self-fencing: a box that cannot renew a subtask's lease stops the attempt itself, strictly
before the job store may give the subtask to another box.

Why it holds (durations in seconds; R = the renew interval, G = the store's LEASE_GRACE):

* s: when the worker *sent* the last renewal (or claim) that Redis acknowledged, on the worker's
  monotonic clock. Redis ran it no earlier, so the lease it set ends at E >= s + TTL.
* The store hands the subtask to another attempt (the reaper, or a delivery taking an expired
  lease over) only once Redis' clock passes E + G, so no other box starts it before s + TTL + G.
* The fence kills the plugin's process group (SIGKILL, on its own thread: a renewal blocked on a
  dead connection cannot delay it) at s + TTL - 2R, plus k, the time to wake and kill.

So the cut-off copy is dead before any other may start while  k < 2R + G.  k is milliseconds; R
is at least TTL/6 (TTL 3 s: R 0.5 s, the fence gives up 2 s after the last acknowledged renewal;
TTL 10 s, the default: R 1 s, 8 s). The margin also covers the clocks' rates (NTP slews a clock
by at most 500 ppm) and a worker process stalled for up to 2R + G - k. It does not cover Redis' clock being
stepped forward by more than that; run NTP in slew mode on the Redis host.

A renewal that Redis ran but whose reply was lost only lengthens the real lease, so timing from
the last *acknowledged* one errs on the safe side. A result the cut-off box writes later is
refused by the store's attempt check.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# The most time between two renewals of a running subtask's lease (and two looks for a cancel).
MAX_RENEW_INTERVAL = 1.0


@dataclass(frozen=True)
class LeaseTiming:
    ttl: float
    renew_interval: float
    give_up_after: float  # since the last acknowledged renewal was sent

    @classmethod
    def of(cls, ttl: float) -> LeaseTiming:
        renew = min(MAX_RENEW_INTERVAL, ttl / 6)
        return cls(ttl=ttl, renew_interval=renew, give_up_after=ttl - 2 * renew)


class LeaseFence:
    """Calls `kill` once `give_up_after` has passed since the last renewal Redis acknowledged.

    `armed=False` defers the watching thread to `arm()`: most subtasks end within the first renew
    interval, and a thread per subtask is a measurable share of a short one's cost. The caller
    must arm it after at most one bounded wait of at most R (the renew interval), before anything
    that can block (a renewal); it then still fires at s + TTL - 2R >= s + 4R, its deadline
    counted from the claim, never from when it was armed."""

    def __init__(self, timing: LeaseTiming, leased_at: float, kill: Callable[[], None], *, armed: bool = True) -> None:
        self.timing = timing
        self._deadline = leased_at + timing.give_up_after
        self._kill = kill
        self._wake: threading.Event | None = None  # made with the thread: unarmed, neither is needed
        self._closed = False
        self.fired_at: float | None = None
        self._thread: threading.Thread | None = None
        if armed:
            self.arm()

    def arm(self) -> None:
        """Start watching (once)."""
        if self._thread is None and not self._closed:
            self._wake = threading.Event()
            self._thread = threading.Thread(target=self._watch, args=(self._wake,), name="lease-fence", daemon=True)
            self._thread.start()

    @property
    def fired(self) -> bool:
        return self.fired_at is not None

    def renewed(self, sent_at: float) -> None:
        """Redis acknowledged a renewal sent at `sent_at` (time.monotonic())."""
        self._deadline = max(self._deadline, sent_at + self.timing.give_up_after)

    def close(self) -> None:
        self._closed = True
        if self._wake is not None:
            self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self, wake: threading.Event) -> None:
        while not self._closed:
            left = self._deadline - time.monotonic()
            if left <= 0:
                self.fired_at = time.monotonic()
                self._kill()
                return
            wake.wait(left)
