"""Job-store calls that outlast a Redis blip: retried with capped exponential backoff.

Only errors that say "Redis is not reachable right now" are retried; an answer from
Redis (a refused claim, a stale result) is never an error here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from edgefleet.tcp_liveness import WORKER_STORE_LIVENESS, LinkLiveness

log = logging.getLogger(__name__)

T = TypeVar("T")

# BusyLoadingError (a restarted Redis still reading its append-only file) is a ConnectionError.
TRANSIENT: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)


def worker_client(url: str, liveness: LinkLiveness = WORKER_STORE_LIVENESS) -> redis.Redis:
    """The worker's client: each call fails fast while Redis is down, so that the runner's own
    loops (which also watch the plugin) decide how long to wait, not redis-py's retries.

    On a dead link (no RST) no call blocks longer than the liveness timeout: a lease renewal
    stuck on a half-open connection raises TimeoutError and the next one reconnects. (The lease
    fence, workers/lease_fence.py, stops the plugin on its own thread, whatever a call waits on.)"""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        decode_responses=True,
        health_check_interval=liveness.health_check_interval,
        socket_keepalive=True,
        socket_keepalive_options=liveness.keepalive_options(),
        socket_connect_timeout=liveness.connect_timeout,
        socket_timeout=liveness.socket_timeout,
        # One quick retry: a pooled connection that a Redis restart closed is replaced at once.
        # Not on a timeout: that would double how long a call can block on a dead link.
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1, supported_errors=(redis.ConnectionError,)),
    )


def retry_transient(call: Callable[[], T], *, patience: float, what: str, max_delay: float = 1.0) -> tuple[T, int]:
    """Call until it returns, retrying transient Redis errors for up to `patience` seconds
    (then the last error is raised). Returns the value and how many tries failed first."""
    started = time.monotonic()
    delay = 0.05
    failures = 0
    while True:
        try:
            return call(), failures
        except TRANSIENT as exc:
            failures += 1
            waited = time.monotonic() - started
            if waited >= patience:
                log.error("job store unreachable; giving up", extra={"what": what, "waited_s": round(waited, 1)})
                raise
            if failures == 1:
                log.warning("job store unreachable; retrying", extra={"what": what, "error": type(exc).__name__})
            time.sleep(min(delay, max(0.0, patience - waited)))
            delay = min(max_delay, delay * 2)
