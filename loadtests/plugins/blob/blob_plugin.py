"""Benchmark plugin: a large file to move between boxes, and a reader that checks it arrived."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from edgefleet.plugin_context import PluginContext

MIB = 1024 * 1024


def run(ctx: PluginContext, action: str, args: dict[str, Any]) -> dict[str, Any]:
    if action == "make":
        target = ctx.workspace_path("blob.bin")
        with open(target, "wb") as out:
            for _ in range(int(args["size_mb"])):
                out.write(os.urandom(MIB))
        return {"path": str(target), "bytes": target.stat().st_size}
    if action == "digest":
        digest = hashlib.sha256()
        size = 0
        with open(ctx.input_path(str(args["path"])), "rb") as handle:
            while chunk := handle.read(MIB):
                digest.update(chunk)
                size += len(chunk)
        return {"sha256": digest.hexdigest(), "bytes": size}
    raise ValueError(f"blob plugin has no action {action!r}")
