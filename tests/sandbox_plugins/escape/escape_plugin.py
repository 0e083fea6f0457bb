"""Each action tries one way out of the sandbox."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from typing import Any


def run(ctx: Any, action: str, args: dict[str, Any]) -> dict[str, Any]:
    if action == "write_outside":
        with open(args["path"], "w") as f:
            f.write("escaped")
        return {"wrote": args["path"]}
    if action == "big_file":
        with open(ctx.workspace / "big.bin", "wb") as f:
            f.write(b"x" * (4 * 1024 * 1024))
        return {"wrote": "4 MB"}
    if action == "open_socket":
        with socket.create_connection(("127.0.0.1", args["port"]), timeout=5) as conn:
            conn.sendall(b"escaped")
        return {"connected": True}
    if action == "spawn":
        return {"code": subprocess.run(["true"]).returncode}
    if action == "fork_bomb":
        children = 0
        while children < 10_000:
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            children += 1
        return {"children": children}
    if action == "memory_bomb":
        hog = []
        while True:
            hog.append(bytearray(32 * 1024 * 1024))
    if action == "cpu_spin":
        while True:
            pass
    if action == "ignore_cancel":
        if args.get("marker"):
            with open(ctx.workspace / "started", "w") as f:
                f.write(str(os.getpid()))
        while True:  # never looks at ctx.cancelled
            time.sleep(0.05)
    if action == "read_secret_env":
        return {"env": sorted(os.environ)}
    raise ValueError(action)
