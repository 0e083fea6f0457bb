"""A resumable batch loop: one JSON line per finished item in the workspace, plus `ctx.checkpoint`.

The order of events for every batch is: outputs written, journal lines written,
both flushed to disk, *then* `ctx.checkpoint({"done": n, ...})`. So a checkpoint
never counts an item whose result could be lost. On resume the journal is cut
back to what the checkpoint counts (items finished after the last checkpoint
are redone, once), and the loop continues from there: the final result lists
every item exactly once.

If the journal is shorter than the checkpoint says (the rerun landed on a box
that does not share this workspace), the loop continues from the journal's end
instead, redoing what it cannot see rather than skipping it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgefleet.plugin_context import PluginContext
from edgefleet.pluginkit.actions import stop_cancelled


def fingerprint(items: Iterable[Any]) -> str:
    """A short digest of the work list: a checkpoint of a different list is not resumed."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps(item, sort_keys=True, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Journal:
    """The results of one batch loop so far; `entries[i]` is the result of work item i."""

    def __init__(self, ctx: PluginContext, name: str, total: int, work_fingerprint: str, every: int) -> None:
        self.ctx = ctx
        self.path = ctx.workspace_path(name)
        self.total = total
        self.fingerprint = work_fingerprint
        self.every = max(1, int(every))
        self.entries: list[dict[str, Any]] = []
        self.started_from = 0
        self.checkpointed = 0  # what the last checkpoint of an earlier attempt said
        self._pending_files: list[Path] = []
        self._since_checkpoint = 0
        self._file: Any = None

    # --- start ---------------------------------------------------------------------------------

    def open(self) -> int:
        """Load what an earlier attempt made durable; return the index to continue from."""
        state = self.ctx.resume()
        done = 0
        if isinstance(state, dict) and state.get("fingerprint") == self.fingerprint:
            done = max(0, min(int(state.get("done") or 0), self.total))
        self.checkpointed = done
        kept = self._read()[:done] if done else []
        self.entries = kept
        self.started_from = len(kept)
        # Rewrite the journal as exactly the kept lines: a line half-written at a crash, or
        # lines finished after the last checkpoint, must not be counted twice.
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(self._line(seq, entry) for seq, entry in enumerate(kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open until close()
        return self.started_from

    def _read(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        break  # torn last line
                    if not isinstance(record, dict) or record.get("seq") != len(out):
                        break
                    out.append(record["entry"])
        except FileNotFoundError:
            pass
        return out

    @staticmethod
    def _line(seq: int, entry: dict[str, Any]) -> str:
        return json.dumps({"seq": seq, "entry": entry}, separators=(",", ":")) + "\n"

    # --- loop ----------------------------------------------------------------------------------

    def add(self, entry: dict[str, Any], files: Iterable[Path] = ()) -> None:
        """Record item `len(entries)` as done; `files` are its outputs, made durable with it."""
        self._file.write(self._line(len(self.entries), entry))
        self.entries.append(entry)
        self._pending_files.extend(files)
        self._since_checkpoint += 1
        if self._since_checkpoint >= self.every:
            self.commit()

    def commit(self) -> None:
        """Make everything added so far durable, then checkpoint it."""
        if self._file is None or (self._since_checkpoint == 0 and not self._pending_files):
            return  # nothing new since the last checkpoint
        for path in self._pending_files:
            _fsync_path(path)
        if self._pending_files:
            _fsync_path(self._pending_files[-1].parent)
        self._pending_files.clear()
        self._file.flush()
        os.fsync(self._file.fileno())
        self.ctx.checkpoint({"done": len(self.entries), "total": self.total, "fingerprint": self.fingerprint})
        self._since_checkpoint = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def stop_if_cancelled(self) -> None:
        """Checkpoint what is done and raise SubtaskCancelled if the subtask must stop."""
        if self.ctx.cancelled:
            self.commit()
            stop_cancelled(self.ctx)

    def pause(self, seconds: float) -> None:
        if seconds > 0 and not self.ctx.sleep(seconds):
            self.stop_if_cancelled()
