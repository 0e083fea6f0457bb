"""Worker nodes: heartbeats with a TTL, the live set, and the models warm on each box."""

from __future__ import annotations

import json

from edgefleet.schemas import NodeInfo
from edgefleet.store.connection import StoreConnection


class NodeStore:
    def __init__(self, connection: StoreConnection) -> None:
        self._conn = connection

    def heartbeat(self, info: NodeInfo, ttl: float) -> None:
        keys = self._conn.keys
        pipe = self._conn.client.pipeline(transaction=True)
        pipe.set(keys.node(info.name), info.model_dump_json(), px=int(ttl * 1000))
        pipe.sadd(keys.nodes, info.name)
        pipe.execute()

    def remove_node(self, name: str) -> None:
        keys = self._conn.keys
        pipe = self._conn.client.pipeline(transaction=True)
        pipe.delete(keys.node(name))
        pipe.srem(keys.nodes, name)
        pipe.execute()

    def live_nodes(self) -> list[NodeInfo]:
        client, keys = self._conn.client, self._conn.keys
        names: list[str] = sorted(client.smembers(keys.nodes))
        if not names:
            return []
        values: list[str | None] = client.mget([keys.node(n) for n in names])
        gone = [n for n, v in zip(names, values, strict=True) if v is None]
        if gone:
            client.srem(keys.nodes, *gone)
        return [NodeInfo.model_validate_json(v) for v in values if v is not None]

    def mark_warm(self, node: str, models: list[str], ttl: float) -> None:
        """Models loaded in some worker process of `node`; read back into the node's heartbeat."""
        if not models:
            return
        key = self._conn.keys.warm_models(node)
        pipe = self._conn.client.pipeline(transaction=True)
        pipe.sadd(key, *models)
        pipe.expire(key, int(ttl))
        pipe.execute()

    def warm_models(self, node: str) -> list[str]:
        return sorted(self._conn.client.smembers(self._conn.keys.warm_models(node)))

    def advertise_router(self, port: int, url: str | None) -> None:
        """Where boxes reach the router: `url` when configured, else the broker's host on `port`
        (a box started with only the broker URL learns the router's address here)."""
        pipe = self._conn.client.pipeline(transaction=False)
        pipe.set(self._conn.keys.key("router_endpoint"), json.dumps({"port": port, "url": url}))
        pipe.execute()

    def router_endpoint(self) -> tuple[int, str | None] | None:
        raw = self._conn.client.get(self._conn.keys.key("router_endpoint"))
        if not raw:
            return None
        data = json.loads(raw)
        return int(data["port"]), data.get("url") or None

    def request_bench(self) -> int:
        """Ask every node to run its benchmark again (workers/bench.py); returns the request number."""
        return int(self._conn.client.incr(self._conn.keys.key("bench_request")))

    def bench_requested(self) -> int:
        """The latest bench request number (0: none yet); a node compares it with the last it answered."""
        return int(self._conn.client.get(self._conn.keys.key("bench_request")) or 0)
