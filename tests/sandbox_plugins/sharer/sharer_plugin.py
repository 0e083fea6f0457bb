"""What a subtask of a shared executor sees of the ones before it (module globals: by design)."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from typing import Any

MARKS: list[str] = []  # kept between the subtasks of one shared executor
# A thread started at import (as a library's pool would be) is the plugin's module state: it does
# not end a shared executor, a thread started by a subtask does.
threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []  # Landlock: not the plugin's to list


def run(ctx: Any, action: str, args: dict[str, Any]) -> dict[str, Any]:
    if action == "mark":
        MARKS.append(args["text"])
        (ctx.workspace / "mark.txt").write_text(args["text"])
        try:  # /tmp is the sandbox's own under bwrap; elsewhere the plugin's uid may not write there
            with open(f"/tmp/mark-{args['text']}", "w") as f:
                f.write(args["text"])
            tmp_written = True
        except OSError:
            tmp_written = False
        with open(os.path.join(tempfile.gettempdir(), f"mark-{args['text']}"), "w") as f:
            f.write(args["text"])
        return {"pid": os.getpid(), "marks": list(MARKS), "workspace": str(ctx.workspace), "tmp_written": tmp_written}
    if action == "look":
        try:
            with open(os.path.join(args["previous"], "mark.txt")) as f:
                previous = args["text"] in f.read()
        except OSError:
            previous = False
        return {
            "pid": os.getpid(),
            "marks": list(MARKS),
            "tmp": [name for name in _listdir("/tmp") if args["text"] in name],
            "tmpdir": [name for name in _listdir(tempfile.gettempdir()) if args["text"] in name],
            "previous": previous,
            "workspace": sorted(os.listdir(ctx.workspace)),
        }
    if action == "thread":
        threading.Thread(target=time.sleep, args=(300,), daemon=True).start()
        return {"pid": os.getpid()}
    if action == "burn":
        end = time.process_time() + float(args["seconds"])
        while time.process_time() < end:
            pass
        return {"pid": os.getpid()}
    if action == "exit":
        os._exit(3)
    raise ValueError(action)
