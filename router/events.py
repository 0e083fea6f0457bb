"""Server-sent events from a job's Redis stream, in stream order, resumable by Last-Event-ID."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

TERMINAL = {"succeeded", "failed", "cancelled"}
BLOCK_MS = 5000
# The client's socket timeout must outlast a blocking XREAD, else every quiet spell of
# BLOCK_MS ends the stream with a TimeoutError (redis-py's default socket timeout is 5 s).
SOCKET_TIMEOUT = BLOCK_MS / 1000 + 10


def decode_event(fields: dict[str, str]) -> dict[str, Any]:
    event: dict[str, Any] = {"type": fields.get("type"), "ts": float(fields.get("ts", 0))}
    if "subtask" in fields:
        event["subtask"] = fields["subtask"]
    if "state" in fields:
        event["state"] = fields["state"]
    if "data" in fields:
        data = json.loads(fields["data"])
        if isinstance(data, dict):
            event.update({k: v for k, v in data.items() if v is not None})
    return event


async def job_event_stream(
    client: aioredis.Redis, stream_key: str, last_id: str, job_key: str | None = None
) -> AsyncIterator[dict[str, str]]:
    """Events after `last_id` until the job's terminal event.

    With `job_key`, a job that is already finished gets what is left of its stream and
    then the end, not a wait for events that never come: EventSource clients reconnect
    after the stream closes, with the id of the terminal event as Last-Event-ID.
    """
    while True:
        finished = job_key is not None and await client.hget(job_key, "state") in TERMINAL
        batches = await client.xread({stream_key: last_id}, count=200, block=None if finished else BLOCK_MS)
        if finished and not batches:
            return
        for _, entries in batches or []:
            for entry_id, fields in entries:
                last_id = entry_id
                event = decode_event(fields)
                yield {"id": entry_id, "event": event["type"] or "message", "data": json.dumps(event)}
                if event["type"] == "job" and event.get("state") in TERMINAL:
                    return
