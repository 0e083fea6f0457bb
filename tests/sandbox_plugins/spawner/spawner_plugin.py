"""Starts a process that escapes its session and outlives the subtask, if the sandbox lets it."""

from __future__ import annotations

import os
import time
from typing import Any


def run(ctx: Any, action: str, args: dict[str, Any]) -> dict[str, Any]:
    if action == "daemon":
        read, write = os.pipe()
        if os.fork() == 0:  # double fork + setsid: re-parented away from the subtask's process
            os.setsid()
            if os.fork() == 0:
                os.write(write, f"{os.getpid()}\n".encode())
                time.sleep(300)
            os._exit(0)
        pid = int(os.read(read, 64).decode())
        return {"pid": pid}
    if action == "alive":
        try:
            os.kill(args["pid"], 0)
            return {"alive": True}
        except ProcessLookupError:
            return {"alive": False}
        except PermissionError:
            return {"alive": True}  # a process of another uid with that number: not ours, but there
    raise ValueError(action)
