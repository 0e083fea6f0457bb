"""Retention on a worker box: the workspaces of jobs that are over are removed.

Each subtask works in `<workspace_dir>/<job_id>/<subtask_id>` (or a link from there to a
warm launcher's folder `<workspace_dir>/.sandbox/<id>`, see `workers.sandbox_pool`). The
router deletes finished jobs from Redis after the retention; each node removes a job's
folder once the folder has not changed for the retention and its job is finished or no
longer in the store. A running job's folder stays, however old.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from pathlib import Path

from edgefleet.settings import Settings
from edgefleet.store import JobStore
from edgefleet.workers.sandbox_pool import SLOT_DIR

log = logging.getLogger(__name__)

JOB_DIR = re.compile(r"[0-9a-f]{32}")  # job ids are uuid4 hex; anything else here is not ours


def _linked_slots(job_dir: Path, slot_root: Path) -> list[Path]:
    """Warm launchers' folders the job's links point to (only those: a link elsewhere is not followed)."""
    found = []
    for entry in job_dir.iterdir():
        if entry.is_symlink():
            target = entry.resolve()
            if target.parent == slot_root and target.is_dir():
                found.append(target)
    return found


def sweep_workspaces(root: Path, store: JobStore, retention: float, now: float | None = None) -> list[str]:
    """Remove the folders of jobs that are over (see the module's docstring); the job ids removed."""
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    slot_root = (root / SLOT_DIR).resolve()
    old = [
        entry
        for entry in root.iterdir()
        if JOB_DIR.fullmatch(entry.name)
        and not entry.is_symlink()
        and entry.is_dir()
        and now - entry.stat().st_mtime >= retention
    ]
    if not old:
        return []
    states = store.job_states([entry.name for entry in old])
    removed = []
    for entry in old:
        if states.get(entry.name) == "running":
            continue
        for slot in _linked_slots(entry, slot_root):
            shutil.rmtree(slot, ignore_errors=True)
        shutil.rmtree(entry, ignore_errors=True)  # never follows links: only the folder itself goes
        if entry.exists():
            log.warning("could not remove an expired workspace", extra={"path": str(entry)})
        else:
            removed.append(entry.name)
    return removed


def start_workspace_gc(settings: Settings, store: JobStore, stop: threading.Event) -> threading.Thread:
    """Sweep this node's workspaces every `gc_interval` seconds until `stop` is set."""

    def run() -> None:
        while not stop.wait(settings.gc_interval):
            try:
                removed = sweep_workspaces(settings.effective_workspace_dir, store, settings.job_retention)
            except Exception:
                log.warning("workspace sweep failed; retrying", exc_info=True)
                continue
            if removed:
                log.info("removed workspaces of finished jobs", extra={"count": len(removed)})

    thread = threading.Thread(target=run, name="workspace-gc", daemon=True)
    thread.start()
    return thread
