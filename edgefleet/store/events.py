"""A job's events as the job store writes them, read without a thread.

The form (prelude.lua `event`): each event is one packed string in the job's list
`Keys.job_events(job_id)`, and a doorbell `{j: job_id}` in the shared, capped stream
`Keys.event_feed` whose entry id is the event's id. A follower reads the job's list, then
blocks on the one feed until a doorbell of its job rings, and reads the list again: one
small list per job (bytes, where a stream per job cost ~4.7 KB) and one wait for everyone.
Jobs created before this form have a stream of their own (`Keys.events(job_id)`, fields
type/ts/subtask/state/data): it is read too and merged by id, so nothing needs migrating;
retention deletes both.

The router's server-sent events read through this: an asyncio client, so an open stream
holds no thread while it waits for the next event.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Final, cast

import redis.asyncio as aioredis

from edgefleet.keys import Keys

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
BLOCK_MS = 5000
# The client's socket timeout must outlast a blocking XREAD, else every quiet spell of
# BLOCK_MS ends the stream with a TimeoutError (redis-py's default socket timeout is 5 s).
SOCKET_TIMEOUT = BLOCK_MS / 1000 + 10
# At most prelude.lua's EVENT_FEED_LEN: a batch this full may follow doorbells trimmed before
# the reader got to them, so the reader then reads its job's list whatever the batch holds.
FEED_COUNT = 500
# The packed event's parts after its id, in order; '' stands for an absent part.
PACKED_FIELDS: Final = ("type", "ts", "subtask", "state", "data")

Event = tuple[str, dict[str, str]]  # (event id, fields as the old stream per job had them)
Batches = list[tuple[str, list[tuple[str, dict[str, str]]]]]


def event_id(text: str) -> tuple[int, int]:
    """A stream id ('1712345678901-0', or just the milliseconds) as a comparable pair."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def unpack_event(packed: str) -> Event:
    """One element of a job's event list as (id, fields)."""
    entry_id, *parts = packed.split("\t", len(PACKED_FIELDS))
    return entry_id, {name: value for name, value in zip(PACKED_FIELDS, parts, strict=False) if value}


def is_terminal(fields: dict[str, str]) -> bool:
    return fields.get("type") == "job" and fields.get("state") in TERMINAL


class JobEventReader:
    def __init__(self, client: aioredis.Redis, prefix: str = "ef", block_ms: int = BLOCK_MS) -> None:
        """`block_ms`: the longest wait on the feed before the job's state is looked at again
        (the client's socket timeout must be longer)."""
        self._client = client
        self._keys = Keys(prefix)
        self._block_ms = block_ms

    @classmethod
    def from_url(cls, url: str, prefix: str = "ef") -> JobEventReader:
        return cls(aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=SOCKET_TIMEOUT), prefix)

    async def entries(self, job_id: str, last_id: str) -> AsyncGenerator[Event, None]:
        """(event id, fields) after `last_id`, in order, until the job's terminal event.

        A job that is already finished (or gone) gets what is left of its events and then the
        end, not a wait for events that never come: EventSource clients reconnect after the
        stream closes, with the id of the terminal event as Last-Event-ID.
        """
        after = event_id(last_id)
        legacy = bool(await self._client.exists(self._keys.events(job_id)))
        # Taken before the first read of the list: a doorbell after it is an event the read may miss.
        cursor = await self._feed_tail()
        hint = 0
        while True:
            # The state before the events: a job that had ended by then has its last event stored.
            state = await self._client.hget(self._keys.job(job_id), "state")
            new, hint = await self._events_after(job_id, after, hint, legacy)
            for entry_id, fields in new:
                after = event_id(entry_id)
                yield entry_id, fields
                if is_terminal(fields):
                    return
            if state is None or state in TERMINAL:
                return
            cursor = await self._wait(job_id, cursor)

    async def _events_after(
        self, job_id: str, after: tuple[int, int], hint: int, legacy: bool
    ) -> tuple[list[Event], int]:
        """Events with an id after `after`, and the new `hint`: how much of the list has been read.

        The list is read from the last element already seen; when that is no longer where it
        was (the list dropped its oldest past EVENTS_PER_JOB), the whole list is read again.
        """
        key = self._keys.job_events(job_id)
        start = max(hint - 1, 0)
        raw = cast(list[str], await self._client.lrange(key, start, -1))
        if hint > 0 and (not raw or event_id(raw[0].partition("\t")[0]) > after):
            start, raw = 0, cast(list[str], await self._client.lrange(key, 0, -1))
        events = [event for event in map(unpack_event, raw) if event_id(event[0]) > after]
        if legacy:
            old = await self._client.xrange(self._keys.events(job_id), min=f"({after[0]}-{after[1]}", max="+")
            events = sorted([*events, *cast(list[Event], old)], key=lambda event: event_id(event[0]))
        return events, start + len(raw)

    async def _feed_tail(self) -> str:
        last = cast(list[Event], await self._client.xrevrange(self._keys.event_feed, count=1))
        return last[0][0] if last else "0-0"

    async def _wait(self, job_id: str, cursor: str) -> str:
        """Until a doorbell of `job_id` rings, one may have been missed, or BLOCK_MS passed: the
        feed's new cursor. The time bound lets the caller look at the job's state now and then."""
        until = time.monotonic() + self._block_ms / 1000
        while (left_ms := int((until - time.monotonic()) * 1000)) > 0:
            batches = cast(
                Batches, await self._client.xread({self._keys.event_feed: cursor}, count=FEED_COUNT, block=left_ms)
            )
            if not batches:
                break
            entries = batches[0][1]
            cursor = entries[-1][0]
            if len(entries) >= FEED_COUNT or any(fields.get("j") == job_id for _, fields in entries):
                break
        return cursor

    async def aclose(self) -> None:
        await self._client.aclose()
