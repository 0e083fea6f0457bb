"""Webhook delivery: durable (the schedule is in Redis), concurrent, signed, and only where allowed.

One asyncio loop per router (in a thread of its own) moves ended jobs into the schedule,
claims due deliveries and runs each attempt as a task. An attempt has one deadline for
everything (lookup, connect, send, response headers), and a router runs at most
`webhook_per_destination` attempts to one host:port and `webhook_per_tenant` for one tenant
at a time, so a receiver that hangs holds up its own deliveries and nobody else's.

Only a 2xx answer is a delivery. 408, 429, 5xx and network errors are retried with
exponential backoff, never sooner than the answer's `Retry-After`, until
`callback_attempts` attempts or `webhook_max_age` seconds; any other answer (3xx
included: redirects are not followed) fails the delivery at once. Each request is signed
per the Standard Webhooks spec with the tenant's secret; `webhook-id` is the same for
every attempt of one delivery, so a receiver can drop the duplicate that at-least-once
delivery allows (a router killed after the receiver answered, before it was recorded).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import threading
import time
from collections import Counter as Tally
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx
from prometheus_client import Counter
from standardwebhooks import Webhook

from edgefleet import netguard
from edgefleet.netguard import OutboundGuard, RefusedURL
from edgefleet.settings import Settings
from edgefleet.store import JobStore
from edgefleet.store.webhooks import Delivery, WebhookStore

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
LEASE_MARGIN = 15.0  # a claim outlives its attempt's deadline by this much before another router may take it
SCAN_PAGE = 100
SCAN_MAX = 2000  # due deliveries looked at per round while looking for ones whose limits have room
RETRYABLE = {408, 429}
USER_AGENT = "edgefleet-webhooks/1"
SUBMIT_LOOKUP_SECONDS = 2.0


def build_guard(settings: Settings) -> OutboundGuard:
    """The outbound rule for webhooks: public addresses, plus what the operator allowed, never the
    cluster's own Redis and router."""
    own: list[tuple[str, int]] = [(settings.router_host, settings.router_port)]
    for url in {settings.redis_url, settings.effective_broker_url}:
        parts = urlsplit(url)
        if parts.scheme in ("redis", "rediss") and parts.hostname:
            try:
                own.append((parts.hostname, parts.port or 6379))
            except ValueError:  # a malformed port: the store would not connect either
                continue
    return OutboundGuard.build(
        allow_private=settings.webhook_allow_private,
        allowed_networks=settings.webhook_allowed_networks,
        own_endpoints=own,
        max_url_length=settings.webhook_max_url_length,
    )


async def callback_url_problem(guard: OutboundGuard, url: str) -> str | None:
    """Why a submitted `callback_url` is refused, or None. A name that does not resolve yet (or not
    within SUBMIT_LOOKUP_SECONDS) is accepted: it is checked again at each delivery."""
    try:
        await guard.acheck_if_resolvable(url, SUBMIT_LOOKUP_SECONDS)
    except RefusedURL as exc:
        return f"{exc}; webhooks may not reach it (operators: EDGEFLEET_WEBHOOK_ALLOWED_NETWORKS)"
    return None


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a `Retry-After` header: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def sign(secrets: list[str], msg_id: str, when: datetime, payload: str) -> str:
    """`webhook-signature`: one `v1,<base64>` per secret, so a receiver with either secret of a
    rotation verifies."""
    return " ".join(Webhook(secret).sign(msg_id, when, payload) for secret in secrets)


class WebhookSender:
    def __init__(
        self, store: WebhookStore, jobs: JobStore, settings: Settings, guard: OutboundGuard, outcomes: Counter
    ) -> None:
        self.store = store
        self.jobs = jobs
        self.settings = settings
        self.guard = guard
        self.outcomes = outcomes
        self._by_destination: Tally[str] = Tally()
        self._by_tenant: Tally[str] = Tally()
        self._tasks: set[asyncio.Task[None]] = set()

    # --- the loop ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Deliver until `stop` is set; then hand unfinished attempts back to the schedule."""
        # Lookups and Redis calls run in threads; a pool of our own, sized for every attempt
        # in flight, so slow DNS answers cannot starve the Redis calls.
        workers = 2 * self.settings.webhook_concurrency + 4
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ef-webhook") as pool:
            asyncio.run(self._main(stop, pool))

    async def _main(self, stop: threading.Event, pool: ThreadPoolExecutor) -> None:
        asyncio.get_running_loop().set_default_executor(pool)
        try:
            while not stop.is_set():
                try:
                    await asyncio.to_thread(self.store.intake)
                    started = await self._start_due()
                except Exception:
                    log.exception("webhook round failed; retrying")
                    await asyncio.sleep(1.0)
                    continue
                if not started:
                    await asyncio.sleep(POLL_SECONDS)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _start_due(self) -> int:
        free = self.settings.webhook_concurrency - len(self._tasks)
        started = 0
        offset = 0
        while free > started and offset < SCAN_MAX:
            page = await asyncio.to_thread(self.store.due, offset, SCAN_PAGE)
            for delivery_id, tenant, url in page:
                if started >= free:
                    break
                destination = self._destination(url)
                if (
                    self._by_destination[destination] >= self.settings.webhook_per_destination
                    or self._by_tenant[tenant] >= self.settings.webhook_per_tenant
                ):
                    continue
                lease = self.settings.webhook_timeout + LEASE_MARGIN
                delivery = await asyncio.to_thread(self.store.claim, delivery_id, lease)
                if delivery is None:
                    continue  # another router took it
                self._by_destination[destination] += 1
                self._by_tenant[tenant] += 1
                task = asyncio.create_task(self._attempt(delivery, destination))
                self._tasks.add(task)
                started += 1
            if len(page) < SCAN_PAGE:
                break
            offset += SCAN_PAGE
        return started

    def _destination(self, url: str) -> str:
        try:
            return self.guard.parse(url).destination
        except RefusedURL:
            return "(invalid)"

    async def _attempt(self, delivery: Delivery, destination: str) -> None:
        try:
            await self._deliver(delivery, destination)
        except asyncio.CancelledError:
            # The router is stopping: give the delivery back now rather than when the lease ends.
            await asyncio.shield(asyncio.to_thread(self.store.retry, delivery, 0.0, None, "router stopped"))
            raise
        except Exception:
            log.exception("webhook attempt failed", extra={"delivery_id": delivery.id, "job_id": delivery.job_id})
        finally:
            self._by_destination[destination] -= 1
            self._by_tenant[delivery.tenant] -= 1
            task = asyncio.current_task()
            if task is not None:
                self._tasks.discard(task)

    # --- one attempt ---------------------------------------------------------------------

    async def _deliver(self, delivery: Delivery, destination: str) -> None:
        status = await asyncio.to_thread(self.jobs.get_job, delivery.job_id)
        if status is None:
            await self._give_up(delivery, "failed", None, "the job's record is gone")
            return
        payload = json.dumps(status.model_dump(mode="json"), separators=(",", ":"), ensure_ascii=False)
        secrets = await asyncio.to_thread(self.store.signing_secrets, delivery.tenant)
        now = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": delivery.id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": sign(secrets, delivery.id, now, payload),
        }
        answer: httpx.Response | None = None
        error = ""
        try:
            # Streamed and never read: only the status and headers matter, whatever the body's size.
            async with (
                asyncio.timeout(self.settings.webhook_timeout),
                netguard.async_client(self.guard, self.settings.webhook_timeout) as http,
                http.stream("POST", delivery.url, content=payload.encode(), headers=headers) as answer,
            ):
                pass
        except RefusedURL as exc:
            log.warning(
                "webhook refused", extra={"delivery_id": delivery.id, "job_id": delivery.job_id, "reason": str(exc)}
            )
            await self._give_up(delivery, "refused", None, f"refused: {exc}")
            return
        except TimeoutError:
            answer, error = None, f"no answer within {self.settings.webhook_timeout:g} s"
        except (httpx.HTTPError, OSError) as exc:
            answer, error = None, type(exc).__name__
        code = answer.status_code if answer is not None else None
        extra = {
            "delivery_id": delivery.id,
            "job_id": delivery.job_id,
            "attempt": delivery.attempt,
            "status": code,
            "destination": destination,
        }
        if code is not None and 200 <= code < 300:
            if await asyncio.to_thread(self.store.finish, delivery, "delivered", code, "", self.settings.webhook_keep):
                self.outcomes.labels(outcome="delivered").inc()
                log.info("webhook delivered", extra=extra)
            return
        if code is not None and not (code in RETRYABLE or code >= 500):
            log.warning("webhook refused by its receiver", extra=extra)
            await self._give_up(delivery, "failed", code, f"HTTP {code}")
            return
        error = error or f"HTTP {code}"
        wait = self._backoff(delivery, answer)
        if wait is None:
            log.warning("webhook gave up", extra={**extra, "error": error})
            await self._give_up(delivery, "failed", code, error)
            return
        if await asyncio.to_thread(self.store.retry, delivery, wait, code, error):
            self.outcomes.labels(outcome="retried").inc()
            log.info("webhook will be retried", extra={**extra, "error": error, "in_s": round(wait, 2)})

    def _backoff(self, delivery: Delivery, answer: httpx.Response | None) -> float | None:
        """Seconds until the next attempt, or None when the attempts or the age are used up."""
        if delivery.attempt >= self.settings.callback_attempts:
            return None
        now = time.time()
        wait = min(self.settings.webhook_backoff * 2 ** (delivery.attempt - 1), self.settings.webhook_backoff_max)
        wait *= random.uniform(1.0, 1.2)
        asked = retry_after(answer.headers.get("retry-after"), now) if answer is not None else None
        if asked is not None:
            wait = max(wait, asked)
        if now + wait > delivery.created_at + self.settings.webhook_max_age:
            return None
        return float(wait)

    async def _give_up(self, delivery: Delivery, outcome: str, code: int | None, error: str) -> None:
        """The delivery failed for good; `outcome` is the metric's label (failed, refused)."""
        if await asyncio.to_thread(self.store.finish, delivery, "failed", code, error, self.settings.webhook_keep):
            self.outcomes.labels(outcome=outcome).inc()
