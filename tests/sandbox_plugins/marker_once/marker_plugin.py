"""Leaves a mark of one subtask everywhere a plugin can write, and looks for it in the next."""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from typing import Any

IMPORTED = uuid.uuid4().hex  # set once per import: the same in every subtask of one executor
MARKS: list[str] = []  # what subtasks of this process appended (a fresh fork sees the import's: none)


def _try_write(path: str, text: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(text)
        return True
    except OSError:
        return False


def run(ctx: Any, action: str, args: dict[str, Any]) -> dict[str, Any]:
    if action == "mark":
        text = args["text"]
        MARKS.append(text)
        (ctx.workspace / "mark.txt").write_text(text)
        return {
            "imported": IMPORTED,
            "pid": os.getpid(),
            "workspace": str(ctx.workspace),
            "cwd": os.getcwd(),
            "tmp_written": _try_write(f"/tmp/mark-{text}", text),
            "tmpdir_written": _try_write(os.path.join(tempfile.gettempdir(), f"mark-{text}"), text),
        }
    if action == "look":
        text = args["text"]
        previous = args["previous"]
        try:
            tmp = os.listdir("/tmp")
        except OSError:
            tmp = []
        try:
            beside = sorted(os.listdir(os.path.dirname(os.path.realpath(ctx.workspace))))
        except OSError:
            beside = []  # Landlock: the executor's root is not the subtask's to list
        try:
            with open(os.path.join(previous, "mark.txt")) as f:
                seen_previous = text in f.read()
        except OSError:
            seen_previous = False
        return {
            "imported": IMPORTED,
            "globals": list(MARKS),
            "tmp": [name for name in tmp if text in name],
            "tmpdir": [name for name in os.listdir(tempfile.gettempdir()) if text in name],
            "previous": seen_previous,
            "workspace": sorted(os.listdir(ctx.workspace)),
            "beside": beside,
        }
    if action == "fail":
        raise RuntimeError("asked to fail")
    if action == "hang":
        while True:
            time.sleep(0.1)
    raise ValueError(action)
