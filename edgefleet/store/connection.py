"""One Redis client, the key names and the loaded scripts: what every store class shares."""

from __future__ import annotations

from typing import Any

import redis

from edgefleet.keys import Keys
from edgefleet.store.scripts import LuaScripts


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30, socket_keepalive=True)


class StoreConnection:
    """Store classes (jobs, attempts, nodes, webhooks, the scheduler's state) are built on one
    of these, so a process holds one client and registers each script once."""

    def __init__(self, client: redis.Redis, prefix: str = "ef") -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.scripts = LuaScripts(client)

    def run(self, name: str, *args: Any) -> Any:
        """Run the store script `name` (see `edgefleet.store.scripts.SCRIPTS`) with these ARGV after the prefix."""
        return self.scripts.run(name, self.keys.prefix, *args)

    def close(self) -> None:
        self.client.close()
