"""Webhook deliveries and signing secrets in Redis, so that any router resumes what another left.

`<prefix>:webhooks:due` (sorted set) holds each pending delivery's id scored by when it
may next be attempted; `<prefix>:webhook:<id>` (hash) is its record. Claiming a due
delivery bumps its attempt number and moves its score forward by a lease in one script,
so of two routers only one gets it, and a router that dies holding it loses it when the
lease ends. The end of an attempt is written only by the claim that made it (same attempt
number, still pending), so a late writer whose lease ran out changes nothing.

The job store's Lua pushes a job id onto `<prefix>:callbacks` when a job with a
`callback_url` ends; `intake` moves those ids into the schedule inside one script, so a
router that dies in between loses nothing. The scripts are `lua/webhook_*.lua`.
"""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from edgefleet.store.connection import StoreConnection

SECRET_PREFIX = "whsec_"


@dataclass(frozen=True)
class Delivery:
    """One claimed attempt of one delivery."""

    id: str  # the `webhook-id`: the same for every attempt
    job_id: str
    tenant: str
    url: str
    attempt: int
    created_at: float


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


class WebhookStore:
    def __init__(self, connection: StoreConnection) -> None:
        self._conn = connection
        self._redis = connection.client
        self._keys = connection.keys

    # --- the schedule ----------------------------------------------------------------------

    def intake(self, limit: int = 100) -> int:
        """Move ended jobs' ids from the callbacks list into the schedule; how many became deliveries."""
        return int(self._conn.run("webhook_intake", limit))

    def due(self, offset: int, limit: int) -> list[tuple[str, str, str]]:
        """(id, tenant, url) of deliveries due now, oldest first; not claimed yet."""
        ids: list[str] = self._redis.zrangebyscore(
            self._keys.webhooks_due, "-inf", time.time(), start=offset, num=limit
        )
        if not ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for delivery_id in ids:
            pipe.hmget(self._keys.webhook(delivery_id), "tenant", "url")
        return [(d, t or "", u or "") for d, (t, u) in zip(ids, pipe.execute(), strict=True)]

    def claim(self, delivery_id: str, lease: float) -> Delivery | None:
        attempt = self._conn.run("webhook_claim", delivery_id, lease)
        if not attempt:
            return None
        rec = self._redis.hmget(self._keys.webhook(delivery_id), "job_id", "tenant", "url", "created_at")
        return Delivery(
            id=delivery_id,
            job_id=rec[0] or "",
            tenant=rec[1] or "",
            url=rec[2] or "",
            attempt=int(attempt),
            created_at=float(rec[3] or time.time()),
        )

    def retry(self, delivery: Delivery, delay: float, status: int | None, error: str) -> bool:
        return bool(self._conn.run("webhook_retry", delivery.id, delivery.attempt, delay, status or "", error))

    def finish(
        self, delivery: Delivery, state: Literal["delivered", "failed"], status: int | None, error: str, keep: float
    ) -> bool:
        return bool(
            self._conn.run(
                "webhook_finish", delivery.id, delivery.attempt, state, status or "", error, int(keep * 1000)
            )
        )

    def record(self, delivery_id: str) -> dict[str, str]:
        return dict(self._redis.hgetall(self._keys.webhook(delivery_id)))

    # --- signing secrets -------------------------------------------------------------------

    def secret(self, tenant: str) -> str:
        """The tenant's current secret, made on first use (HSETNX: two routers agree on one)."""
        key = self._keys.webhook_secret(tenant)
        current: str | None = self._redis.hget(key, "current")
        if current:
            return current
        if self._redis.hsetnx(key, "current", new_secret()):
            self._redis.hset(key, "created_at", time.time())
        return self._redis.hget(key, "current") or ""

    def signing_secrets(self, tenant: str) -> list[str]:
        """Current secret first, then the previous one while its grace after a rotation lasts."""
        current = self.secret(tenant)
        previous, until = self._redis.hmget(self._keys.webhook_secret(tenant), "previous", "previous_until")
        if previous and until and float(until) > time.time():
            return [current, previous]
        return [current]

    def rotate(self, tenant: str, grace: float) -> str:
        self._conn.run("webhook_rotate", tenant, new_secret(), grace)
        return self.secret(tenant)

    def secret_info(self, tenant: str) -> dict[str, object]:
        self.secret(tenant)
        raw = self._redis.hgetall(self._keys.webhook_secret(tenant))
        until = float(raw["previous_until"]) if raw.get("previous_until") else None
        return {
            "tenant": tenant,
            "secret": raw["current"],
            "created_at": float(raw["created_at"]) if raw.get("created_at") else None,
            "previous_valid_until": until if until and until > time.time() else None,
        }
