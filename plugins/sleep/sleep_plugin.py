"""Built-in `sleep` plugin: sleeps, optionally fails; the cluster's test and demo workload."""

from __future__ import annotations

import os
from typing import Any

from edgefleet.plugin_context import PluginContext, SubtaskCancelled

MAX_SECONDS = 86_400


def run(ctx: PluginContext, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """Entry point named in plugin.yaml."""
    if action == "tick":
        return _tick(ctx, args)
    if action != "sleep":
        raise ValueError(f"sleep plugin has no action {action!r} (actions: sleep, tick)")
    seconds = args.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_SECONDS:
        raise ValueError(f"'seconds' must be a number from 0 to {MAX_SECONDS}, got {seconds!r}")
    fail_times = int(args.get("fail_times", 0))

    marker = args.get("marker")
    if marker:
        # One line per execution (not per success): tests count runs and duplicates with it.
        with open(ctx.input_path(str(marker)), "a", encoding="utf-8") as f:
            f.write(f"{ctx.subtask_id} {ctx.attempt} {os.getpid()}\n")

    ctx.progress(0.0, f"sleeping {seconds:g} s")
    if not ctx.sleep(seconds):
        ctx.check_cancelled()
        raise SubtaskCancelled("subtask was cancelled")  # cancelled, then un-cancelled: still stop
    if args.get("fail"):
        raise RuntimeError("asked to fail")
    if ctx.attempt <= fail_times:
        raise RuntimeError(f"asked to fail on attempt {ctx.attempt} (fail_times={fail_times})")
    ctx.progress(1.0, "done")
    return {"slept": seconds, "attempt": ctx.attempt}


def _tick(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    """Count to `ticks`, one per `interval` seconds, checkpointing after each: a rerun resumes."""
    ticks = int(args["ticks"])
    interval = float(args.get("interval", 0.1))
    state = ctx.resume() or {"done": 0}
    started_from = state["done"]
    marker = args.get("marker")
    for tick in range(started_from, ticks):
        if not ctx.sleep(interval):
            ctx.check_cancelled()
            raise SubtaskCancelled("subtask was cancelled")
        if marker:
            with open(ctx.input_path(str(marker)), "a", encoding="utf-8") as f:
                f.write(f"tick {tick} {ctx.attempt} {os.getpid()}\n")
        ctx.checkpoint({"done": tick + 1})
        ctx.progress((tick + 1) / ticks, f"tick {tick + 1}/{ticks}")
    return {"ticks": ticks, "started_from": started_from, "attempt": ctx.attempt}
