"""One Redis client, the key names and the loaded scripts: what every store class shares."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, cast

import redis
from redis.client import Pipeline

from edgefleet.keys import Keys
from edgefleet.store.scripts import LuaScripts

Value = str | int | float


class TextRedis(Protocol):
    """The commands the store uses, typed as a client made with decode_responses=True answers
    them: text, never bytes (redis-py's own types cover both kinds of client)."""

    def get(self, name: str) -> str | None: ...
    def incr(self, name: str, amount: int = 1) -> int: ...
    def hget(self, name: str, key: str) -> str | None: ...
    def hgetall(self, name: str) -> dict[str, str]: ...
    def hmget(self, name: str, keys: Sequence[str], *args: str) -> list[str | None]: ...
    def hset(
        self, name: str, key: str | None = None, value: Value | None = None, mapping: Mapping[str, Value] | None = None
    ) -> int: ...
    def hsetnx(self, name: str, key: str, value: Value) -> int: ...
    def hincrby(self, name: str, key: str, amount: int = 1) -> int: ...
    def zcard(self, name: str) -> int: ...
    def zadd(self, name: str, mapping: Mapping[str, float], nx: bool = False) -> int: ...
    # With withscores=True these answer (member, score) pairs, else members.
    def zrange(self, name: str, start: int, end: int, withscores: bool = False) -> list[Any]: ...
    def zrevrange(self, name: str, start: int, end: int, withscores: bool = False) -> list[Any]: ...
    def zrangebyscore(
        self,
        name: str,
        min: Value,
        max: Value,
        start: int | None = None,
        num: int | None = None,
        withscores: bool = False,
    ) -> list[Any]: ...
    def zrevrangebyscore(
        self,
        name: str,
        max: Value,
        min: Value,
        start: int | None = None,
        num: int | None = None,
        withscores: bool = False,
    ) -> list[Any]: ...
    def zscan_iter(self, name: str) -> Iterator[tuple[str, float]]: ...
    def smembers(self, name: str) -> set[str]: ...
    def srem(self, name: str, *values: str) -> int: ...
    def mget(self, keys: Sequence[str]) -> list[str | None]: ...
    def lrange(self, name: str, start: int, end: int) -> list[str]: ...
    def blpop(self, keys: Sequence[str], timeout: float = 0) -> tuple[str, str] | None: ...
    def time(self) -> tuple[int, int]: ...
    def ping(self) -> bool: ...
    def pipeline(self, transaction: bool = True) -> Pipeline: ...
    def close(self) -> None: ...


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30, socket_keepalive=True)


class StoreConnection:
    """Store classes (jobs, attempts, nodes, webhooks, the scheduler's state) are built on one
    of these, so a process holds one client and registers each script once."""

    def __init__(self, client: redis.Redis, prefix: str = "ef") -> None:
        self.client = cast(TextRedis, client)  # always made with decode_responses=True
        self.keys = Keys(prefix)
        self.scripts = LuaScripts(client)

    def run(self, name: str, *args: Any) -> Any:
        """Run the store script `name` (see `edgefleet.store.scripts.SCRIPTS`) with these ARGV after the prefix."""
        return self.scripts.run(name, self.keys.prefix, *args)

    def close(self) -> None:
        self.client.close()
