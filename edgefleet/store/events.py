"""A job's events as the job store writes them (one Redis stream per job), read without a thread.

The router's server-sent events read through this: an asyncio client, so an open
stream holds no thread while it waits for the next event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

import redis.asyncio as aioredis

from edgefleet.keys import Keys

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
BLOCK_MS = 5000
# The client's socket timeout must outlast a blocking XREAD, else every quiet spell of
# BLOCK_MS ends the stream with a TimeoutError (redis-py's default socket timeout is 5 s).
SOCKET_TIMEOUT = BLOCK_MS / 1000 + 10

Batches = list[tuple[str, list[tuple[str, dict[str, str]]]]]


class JobEventReader:
    def __init__(self, client: aioredis.Redis, prefix: str = "ef") -> None:
        self._client = client
        self._keys = Keys(prefix)

    @classmethod
    def from_url(cls, url: str, prefix: str = "ef") -> JobEventReader:
        return cls(aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=SOCKET_TIMEOUT), prefix)

    async def entries(self, job_id: str, last_id: str) -> AsyncIterator[tuple[str, dict[str, str]]]:
        """(entry id, fields) after `last_id`, in stream order, until the job's terminal event.

        A job that is already finished gets what is left of its stream and then the end, not
        a wait for events that never come: EventSource clients reconnect after the stream
        closes, with the id of the terminal event as Last-Event-ID.
        """
        stream, job = self._keys.events(job_id), self._keys.job(job_id)
        while True:
            finished = await self._client.hget(job, "state") in TERMINAL
            # [(stream, [(entry id, fields), ...])], text: the client decodes responses
            batches = cast(
                Batches, await self._client.xread({stream: last_id}, count=200, block=None if finished else BLOCK_MS)
            )
            if finished and not batches:
                return
            for _, entries in batches or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    yield entry_id, fields
                    if fields.get("type") == "job" and fields.get("state") in TERMINAL:
                        return

    async def aclose(self) -> None:
        await self._client.aclose()
