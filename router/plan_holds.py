"""Goal plans held for a person to confirm (`202 requires_confirmation`), kept in this router's memory.

A held plan has made no job yet, so it is not in the store: it lives here until it is confirmed
(`POST /v1/jobs/{id}/confirm`) or expires. A router restart, or a confirm sent to another router,
loses it; the 202 answer carries the plan itself, which the client can always submit as is.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HOLD_TTL_S = 3600.0
MAX_HOLDS = 1000  # oldest dropped first: an unconfirmed plan must not grow the router without bound


@dataclass(frozen=True)
class Hold:
    id: str
    tenant: str
    created_at: float
    # What the submitter needs to make the job on confirmation (request, digest, planned, key).
    payload: Any


class HeldPlans:
    def __init__(
        self, ttl: float = HOLD_TTL_S, limit: int = MAX_HOLDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.limit = limit
        self.clock = clock
        self._lock = threading.Lock()
        self._holds: OrderedDict[str, Hold] = OrderedDict()

    def _expire(self, now: float) -> None:
        while self._holds:
            oldest = next(iter(self._holds.values()))
            if now - oldest.created_at < self.ttl and len(self._holds) <= self.limit:
                return
            self._holds.popitem(last=False)

    def put(self, tenant: str, payload: Any) -> Hold:
        now = self.clock()
        hold = Hold(uuid.uuid4().hex, tenant, now, payload)
        with self._lock:
            self._holds[hold.id] = hold
            self._expire(now)
        return hold

    def take(self, hold_id: str, tenant: str | None) -> Hold | None:
        """The hold `hold_id` of `tenant` (any tenant when None), removed; None when absent or expired."""
        with self._lock:
            self._expire(self.clock())
            hold = self._holds.get(hold_id)
            if hold is None or (tenant is not None and hold.tenant != tenant):
                return None
            del self._holds[hold_id]
            return hold

    def put_back(self, hold: Hold) -> None:
        """Keep a hold whose confirmation failed (e.g. the fleet cannot run it yet) for another try."""
        with self._lock:
            self._holds[hold.id] = hold
