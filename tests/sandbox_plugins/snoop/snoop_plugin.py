"""Reads and writes where it is told: the sandbox decides what it reaches."""

from __future__ import annotations

from typing import Any


def run(ctx: Any, action: str, args: dict[str, Any]) -> dict[str, Any]:
    if action in ("read_file", "checked_read"):
        with open(args["path"], "rb") as f:
            return {"read": f.read(200).decode("latin-1")}
    if action == "write_file":
        with open(args["path"], "w") as f:
            f.write("written by snoop")
        return {"wrote": args["path"]}
    raise ValueError(action)
