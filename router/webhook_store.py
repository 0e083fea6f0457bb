"""Webhook deliveries and signing secrets in Redis, so that any router resumes what another left.

`<prefix>:webhooks:due` (sorted set) holds each pending delivery's id scored by when it
may next be attempted; `<prefix>:webhook:<id>` (hash) is its record. Claiming a due
delivery bumps its attempt number and moves its score forward by a lease in one script,
so of two routers only one gets it, and a router that dies holding it loses it when the
lease ends. The end of an attempt is written only by the claim that made it (same attempt
number, still pending), so a late writer whose lease ran out changes nothing.

The job store's Lua pushes a job id onto `<prefix>:callbacks` when a job with a
`callback_url` ends; `intake` moves those ids into the schedule inside one script, so a
router that dies in between loses nothing.
"""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass
from typing import Literal

import redis

from edgefleet.keys import Keys

SECRET_PREFIX = "whsec_"

_INTAKE = r"""
-- KEYS[1] the callbacks list, KEYS[2] the schedule
-- ARGV[1] job key prefix, ARGV[2] delivery key prefix, ARGV[3] how many at most
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local moved = 0
for _ = 1, tonumber(ARGV[3]) do
  local jid = redis.call('LPOP', KEYS[1])
  if not jid then break end
  local id = 'msg_' .. jid
  local dk = ARGV[2] .. id
  local job = redis.call('HMGET', ARGV[1] .. jid, 'callback_url', 'tenant')
  -- One delivery per job: a second push of the same id is not a second webhook.
  if job[1] and job[1] ~= '' and redis.call('EXISTS', dk) == 0 then
    redis.call('HSET', dk, 'id', id, 'job_id', jid, 'tenant', job[2] or '', 'url', job[1],
      'state', 'pending', 'attempt', 0, 'created_at', now, 'next_at', now)
    redis.call('ZADD', KEYS[2], now, id)
    moved = moved + 1
  end
end
return moved
"""

_CLAIM = r"""
-- KEYS[1] the schedule, KEYS[2] the record; ARGV[1] id, ARGV[2] lease seconds
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > now then return false end
if redis.call('HGET', KEYS[2], 'state') ~= 'pending' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return false
end
local attempt = redis.call('HINCRBY', KEYS[2], 'attempt', 1)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], 'claimed_at', now)
return attempt
"""

_RETRY = r"""
-- KEYS[1] the schedule, KEYS[2] the record; ARGV: id, attempt, delay, status, error
local rec = redis.call('HMGET', KEYS[2], 'attempt', 'state')
if rec[1] ~= ARGV[2] or rec[2] ~= 'pending' then return 0 end
local t = redis.call('TIME')
local at = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[3])
redis.call('HSET', KEYS[2], 'last_status', ARGV[4], 'last_error', ARGV[5], 'next_at', at)
redis.call('ZADD', KEYS[1], at, ARGV[1])
return 1
"""

_FINISH = r"""
-- KEYS[1] the schedule, KEYS[2] the record; ARGV: id, attempt, state, status, error, keep ms
local rec = redis.call('HMGET', KEYS[2], 'attempt', 'state')
if rec[1] ~= ARGV[2] or rec[2] ~= 'pending' then return 0 end
local t = redis.call('TIME')
redis.call('HSET', KEYS[2], 'state', ARGV[3], 'last_status', ARGV[4], 'last_error', ARGV[5],
  'finished_at', tonumber(t[1]) + tonumber(t[2]) / 1e6)
redis.call('ZREM', KEYS[1], ARGV[1])
if tonumber(ARGV[6]) > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[6]) else redis.call('DEL', KEYS[2]) end
return 1
"""

_ROTATE = r"""
-- KEYS[1] the tenant's secret hash; ARGV[1] new secret, ARGV[2] grace seconds
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local old = redis.call('HGET', KEYS[1], 'current')
if old and tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], 'previous', old, 'previous_until', now + tonumber(ARGV[2]))
else
  redis.call('HDEL', KEYS[1], 'previous', 'previous_until')
end
redis.call('HSET', KEYS[1], 'current', ARGV[1], 'created_at', now)
return 1
"""


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
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._intake = client.register_script(_INTAKE)
        self._claim = client.register_script(_CLAIM)
        self._retry = client.register_script(_RETRY)
        self._finish = client.register_script(_FINISH)
        self._rotate = client.register_script(_ROTATE)

    # --- the schedule ----------------------------------------------------------------------

    def intake(self, limit: int = 100) -> int:
        """Move ended jobs' ids from the callbacks list into the schedule; how many became deliveries."""
        return int(
            self._intake(
                keys=[self.keys.callbacks, self.keys.webhooks_due],
                args=[self.keys.job(""), self.keys.webhook(""), limit],
            )
        )

    def due(self, offset: int, limit: int) -> list[tuple[str, str, str]]:
        """(id, tenant, url) of deliveries due now, oldest first; not claimed yet."""
        ids = self.redis.zrangebyscore(self.keys.webhooks_due, "-inf", time.time(), start=offset, num=limit)
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for delivery_id in ids:
            pipe.hmget(self.keys.webhook(delivery_id), "tenant", "url")
        return [(d, t or "", u or "") for d, (t, u) in zip(ids, pipe.execute())]

    def claim(self, delivery_id: str, lease: float) -> Delivery | None:
        key = self.keys.webhook(delivery_id)
        attempt = self._claim(keys=[self.keys.webhooks_due, key], args=[delivery_id, lease])
        if not attempt:
            return None
        rec = self.redis.hmget(key, "job_id", "tenant", "url", "created_at")
        return Delivery(
            id=delivery_id, job_id=rec[0] or "", tenant=rec[1] or "", url=rec[2] or "",
            attempt=int(attempt), created_at=float(rec[3] or time.time()),
        )

    def retry(self, delivery: Delivery, delay: float, status: int | None, error: str) -> bool:
        return bool(
            self._retry(
                keys=[self.keys.webhooks_due, self.keys.webhook(delivery.id)],
                args=[delivery.id, delivery.attempt, delay, status or "", error],
            )
        )

    def finish(
        self, delivery: Delivery, state: Literal["delivered", "failed"], status: int | None, error: str, keep: float
    ) -> bool:
        return bool(
            self._finish(
                keys=[self.keys.webhooks_due, self.keys.webhook(delivery.id)],
                args=[delivery.id, delivery.attempt, state, status or "", error, int(keep * 1000)],
            )
        )

    def record(self, delivery_id: str) -> dict[str, str]:
        return self.redis.hgetall(self.keys.webhook(delivery_id))

    # --- signing secrets -------------------------------------------------------------------

    def secret(self, tenant: str) -> str:
        """The tenant's current secret, made on first use (HSETNX: two routers agree on one)."""
        key = self.keys.webhook_secret(tenant)
        current = self.redis.hget(key, "current")
        if current:
            return current
        if self.redis.hsetnx(key, "current", new_secret()):
            self.redis.hset(key, "created_at", time.time())
        return self.redis.hget(key, "current") or ""

    def signing_secrets(self, tenant: str) -> list[str]:
        """Current secret first, then the previous one while its grace after a rotation lasts."""
        current = self.secret(tenant)
        previous, until = self.redis.hmget(self.keys.webhook_secret(tenant), "previous", "previous_until")
        if previous and until and float(until) > time.time():
            return [current, previous]
        return [current]

    def rotate(self, tenant: str, grace: float) -> str:
        self._rotate(keys=[self.keys.webhook_secret(tenant)], args=[new_secret(), grace])
        return self.secret(tenant)

    def secret_info(self, tenant: str) -> dict[str, object]:
        self.secret(tenant)
        raw = self.redis.hgetall(self.keys.webhook_secret(tenant))
        until = float(raw["previous_until"]) if raw.get("previous_until") else None
        return {
            "tenant": tenant,
            "secret": raw["current"],
            "created_at": float(raw["created_at"]) if raw.get("created_at") else None,
            "previous_valid_until": until if until and until > time.time() else None,
        }
