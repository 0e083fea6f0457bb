"""Server-sent events from a job's events (edgefleet/store/events.py), in order, resumable by Last-Event-ID."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from edgefleet.store.events import JobEventReader


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


async def job_event_stream(events: JobEventReader, job_id: str, last_id: str) -> AsyncIterator[dict[str, str]]:
    """The job's events after `last_id` as SSE messages, until its terminal event (see
    `JobEventReader.entries`: a finished job gets what is left, then the end)."""
    async for entry_id, fields in events.entries(job_id, last_id):
        event = decode_event(fields)
        yield {"id": entry_id, "event": event["type"] or "message", "data": json.dumps(event)}
