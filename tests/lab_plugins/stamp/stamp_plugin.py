"""Records its own runs: the lab's evidence of which box ran a step, and when."""

from __future__ import annotations

import time
from typing import Any


def run(ctx: Any, action: str, args: dict[str, Any]) -> dict[str, Any]:
    if action != "run":
        raise ValueError(f"stamp has no action {action!r}")
    seconds = float(args["seconds"])
    interval = float(args.get("interval", 0.05))
    # Line-buffered appends: each record reaches the file as it happens, so a run that is
    # killed leaves every tick it lived to write, and nothing after.
    with open(ctx.input_path(str(args["marker"])), "a", buffering=1, encoding="utf-8") as record:

        def stamp(event: str) -> None:
            record.write(f"{event} {ctx.subtask_id} {ctx.attempt} {time.time():.6f}\n")

        stamp("start")
        ends_at = time.monotonic() + seconds
        while time.monotonic() < ends_at:
            if not ctx.sleep(min(interval, max(0.0, ends_at - time.monotonic()))):
                ctx.check_cancelled()
            stamp("tick")
        stamp("end")
    return {"seconds": seconds, "attempt": ctx.attempt}
