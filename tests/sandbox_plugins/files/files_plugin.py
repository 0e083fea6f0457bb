"""Passes a file from one step to the next, and says where it ran."""

from __future__ import annotations

import os
import tempfile
from typing import Any


def run(ctx: Any, action: str, args: dict[str, Any]) -> dict[str, Any]:
    if action == "write":
        path = ctx.workspace / "note.txt"
        path.write_text(args["text"])
        return {"path": str(path)}
    if action == "read":
        with open(args["path"]) as f:
            return {"text": f.read()}
    if action == "where":
        return {
            "pid": os.getpid(),
            "cwd": os.getcwd(),
            "home": os.environ["HOME"],
            "tmp": tempfile.gettempdir(),
            "workspace": str(ctx.workspace),
        }
    raise ValueError(action)
