"""Connects to a local port: allowed, because the manifest grants `network`."""

from __future__ import annotations

import socket
from typing import Any


def run(ctx: Any, action: str, args: dict[str, Any]) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", args["port"]), timeout=5) as conn:
        conn.sendall(b"hello")
    return {"connected": True}
