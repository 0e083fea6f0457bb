"""The router's background loops: release ready work, reap lost leases, deliver callbacks.

They are threads, not asyncio tasks, because the job store and Celery's producer
are blocking clients; every step is a Lua script, so several routers may run them.
Only the release loop and schedule firing are exclusive: they run in the router that holds
the Redis lease `<prefix>:scheduler:leader` (SET NX PX, renewed while it runs); the others
skip them until the lease expires or is given back. Reaping and callbacks run everywhere.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from prometheus_client import Counter

from edgefleet.router.schedule_firing import ScheduleFirer
from edgefleet.router.webhooks import WebhookSender, build_guard
from edgefleet.scheduling.dispatch import Dispatcher
from edgefleet.scheduling.state import SchedulerState
from edgefleet.settings import Settings
from edgefleet.store import JobStore

log = logging.getLogger(__name__)

DISPATCH_GRACE_SECONDS = 30.0


class RouterLoops:
    def __init__(
        self,
        store: JobStore,
        scheduler: SchedulerState,
        dispatcher: Dispatcher,
        settings: Settings,
        released: Counter,
        requeued: Counter,
        callbacks: Counter,
        router_id: str = "router",
        schedules: ScheduleFirer | None = None,
    ) -> None:
        self.router_id = router_id
        self.schedules = schedules
        self._leading = False
        self._renewed_at = 0.0
        self.store = store
        self.scheduler = scheduler
        self.dispatcher = dispatcher
        self.settings = settings
        self._released = released
        self._requeued = requeued
        self._callbacks = callbacks
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for name, target in (
            ("release", self._release_loop),
            ("reap", self._reap_loop),
            ("callbacks", self._callback_loop),
            ("schedules", self._schedule_loop),
        ):
            thread = threading.Thread(target=self._guarded(name, target), name=f"ef-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        if self._leading:
            try:
                self.scheduler.resign(self.router_id)
            except Exception:
                log.warning("could not give the release lease back")
            self._leading = False

    @property
    def leading(self) -> bool:
        return self._leading

    def _lead(self) -> bool:
        """Take or renew the lease, at most every third of its TTL while we hold it."""
        ttl = self.settings.scheduler_lease_ttl
        now = time.monotonic()
        if self._leading and now - self._renewed_at < ttl / 3:
            return True
        leading = self.scheduler.lead(self.router_id, ttl)
        if leading != self._leading:
            log.info(
                "release lease taken" if leading else "release lease lost",
                extra={"router_id": self.router_id, "leader": self.scheduler.leader()},
            )
        self._leading = leading
        if leading:
            self._renewed_at = now
        return leading

    def _guarded(self, name: str, body: Callable[[], None]) -> Callable[[], None]:
        """Keep a loop alive through Redis restarts: log, back off, go on."""

        def run() -> None:
            while not self._stop.is_set():
                try:
                    body()
                except Exception:
                    log.exception("router loop failed; retrying", extra={"loop": name})
                    self._stop.wait(1.0)

        return run

    def _release_loop(self) -> None:
        """The safety net and the backlog's drain: submissions and finishing workers release
        their own work at once, so this loop only picks up retries, requeued work and
        whatever waited for room under a class's target depth. Only the lease holder runs it."""
        while not self._stop.is_set():
            if not self._lead():
                self._stop.wait(self.settings.release_interval)
                continue
            self.store.attempts.promote_delayed()
            count = self.dispatcher.release_all()
            if count:
                self._released.inc(count)
                self.scheduler.count_loop_release(self.router_id, count)
                continue  # there may be more room or more work
            self._stop.wait(self.settings.release_interval)

    def _schedule_loop(self) -> None:
        """Schedules fire on the release lease's holder; each fire time is claimed in Redis anyway,
        so a router that still believes it leads after losing the lease makes no second job."""
        while self.schedules is not None and not self._stop.wait(self.settings.schedule_tick):
            if self._leading:
                self.schedules.tick()

    def _reap_loop(self) -> None:
        while not self._stop.wait(self.settings.reap_interval):
            requeued = self.store.attempts.reap(
                max_lost=self.settings.max_lost_attempts,
                dispatch_grace=DISPATCH_GRACE_SECONDS,
                stranded_after=self.settings.stranded_after,
            )
            if requeued:
                log.warning("requeued subtasks whose lease expired", extra={"count": requeued})
                self._requeued.inc(requeued)

    def _callback_loop(self) -> None:
        """Webhooks: durable in Redis, delivered concurrently (see router.webhooks); every router runs it."""
        sender = WebhookSender(
            self.store.webhooks,
            self.store,
            self.settings,
            build_guard(self.settings),
            self._callbacks,
        )
        sender.run(self._stop)
