"""Forks as many children as it can (each sleeps), and reports how many it got."""

from __future__ import annotations

import os
import time
from typing import Any


def run(ctx: Any, action: str, args: dict[str, Any]) -> dict[str, Any]:
    started, refused = [], 0
    for _ in range(args["count"]):
        try:
            pid = os.fork()
        except OSError:
            refused += 1
            continue
        if pid == 0:
            time.sleep(3)
            os._exit(0)
        started.append(pid)
    for pid in started:
        os.waitpid(pid, 0)
    return {"started": len(started), "refused": refused}
