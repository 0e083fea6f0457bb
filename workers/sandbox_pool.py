"""Warm sandbox launchers: started ahead of the work, so a subtask does not wait for a process start.

Most subtasks run in reusable executors instead (workers/sandbox_executors.py); these
one-shot launchers serve plugins with `isolation: per_attempt`, nodes with
`EDGEFLEET_SANDBOX_EXECUTOR_SUBTASKS=0`, retries that must see an earlier attempt's
workspace, and, under Landlock, subtasks with inputs.

Starting a sandboxed launcher (bwrap, a fresh Python, rlimits, seccomp, the
plugin's import) costs ~50-200 ms of a 2-core box's time, which dominates short
subtasks. What a launcher prepares depends only on the plugin's manifest (its
`PluginImage`), so while one subtask runs, the next launcher for the same image
is started beside it and waits on its stdin. Each launcher still runs exactly one
subtask and exits: no state passes between subtasks, jobs or tenants.

Under bwrap a launcher's writable folder is bound when it starts, before its
subtask is known. A warm launcher therefore gets a fresh folder of its own,
`<workspace_dir>/.sandbox/<id>`, and the subtask's workspace
`<workspace_dir>/<job>/<subtask>` becomes a symlink to it; later steps of the job
are given read access to the folders those links point to. A warm bwrap launcher
sees only its own folder, so it serves a subtask only when that needs nothing
else: no outputs of earlier steps, no workspace left by an earlier attempt.
The same holds for a launcher confined by Landlock (its rules are fixed before the
plugin is imported). Unconfined (no bwrap, no Landlock) any subtask may take one.
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

from edgefleet.settings import Settings
from edgefleet.workers.sandbox import LauncherProcess, PluginImage, SandboxPolicy, hand_over

log = logging.getLogger(__name__)

SLOT_DIR = ".sandbox"
ETC_DIR = ".sandbox-etc"  # generated passwd/group per sandbox uid


class WarmLaunchers:
    """Idle launchers of one worker process, at most `capacity`, the least recently used evicted."""

    def __init__(
        self, capacity: int, workspace_root: Path, bwrap: str | None, policy: SandboxPolicy | None = None
    ) -> None:
        self.capacity = capacity
        self.workspace_root = workspace_root
        self.bwrap = bwrap
        self.policy = policy
        self._idle: OrderedDict[str, list[LauncherProcess]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_settings(cls, settings: Settings) -> WarmLaunchers:
        policy = SandboxPolicy.from_settings(settings)
        return cls(settings.sandbox_warm, settings.effective_workspace_dir, policy.bwrap, policy)

    def launch(self, image: PluginImage, home: Path, readable: list[Path] | tuple[Path, ...] = ()) -> LauncherProcess:
        """A launcher started now for a subtask whose workspace and inputs are known."""
        isolation = self.policy.isolation(image) if self.policy else None
        return LauncherProcess(
            image,
            bwrap=self.bwrap,
            home=home,
            readable=readable,
            isolation=isolation,
            etc_root=self.workspace_root / ETC_DIR,
        )

    def _confined(self, image: PluginImage) -> bool:
        return self.bwrap is not None or image.landlock

    @property
    def slot_root(self) -> Path:
        return self.workspace_root / SLOT_DIR

    def can_serve(self, image: PluginImage, workspace: Path, has_inputs: bool) -> bool:
        """Whether a warm launcher may run this attempt (see the module's docstring)."""
        if self.capacity <= 0:
            return False
        if not self._confined(image):
            return True
        if workspace.exists() or workspace.is_symlink():
            return False  # an earlier attempt's files: only a launcher started for it binds them
        return not has_inputs

    def take(self, image: PluginImage) -> LauncherProcess | None:
        """A started launcher for this image, or None; a launcher that died while waiting is dropped."""
        with self._lock:
            waiting = self._idle.get(image.key, [])
            while waiting:
                launcher = waiting.pop()
                if launcher.alive():
                    return launcher
                self._drop(launcher)
        return None

    def replenish(self, image: PluginImage) -> None:
        """Start a launcher for this image unless one already waits; evict beyond capacity."""
        if self.capacity <= 0:
            return
        key = image.key
        with self._lock:
            if self._idle.get(key):
                self._idle.move_to_end(key)
                return
        try:
            launcher = self._start(image)
        except OSError:
            log.exception("could not start a warm sandbox launcher", extra={"plugin": image.plugin})
            return
        evicted: list[LauncherProcess] = []
        with self._lock:
            self._idle.setdefault(key, []).append(launcher)
            self._idle.move_to_end(key)
            while sum(len(group) for group in self._idle.values()) > self.capacity:
                oldest_key, oldest = next(iter(self._idle.items()))
                evicted.append(oldest.pop(0))
                if not oldest:
                    del self._idle[oldest_key]
        for launcher in evicted:
            self._drop(launcher)

    def close(self) -> None:
        with self._lock:
            idle = [launcher for group in self._idle.values() for launcher in group]
            self._idle.clear()
        for launcher in idle:
            self._drop(launcher)

    def idle_count(self) -> int:
        with self._lock:
            return sum(len(group) for group in self._idle.values())

    def _start(self, image: PluginImage) -> LauncherProcess:
        if not self._confined(image):
            # Unconfined: the launcher moves into its subtask's workspace when the run arrives.
            self.workspace_root.mkdir(parents=True, exist_ok=True)
            return self.launch(image, home=self.workspace_root)
        home = self.slot_root / uuid.uuid4().hex
        (home / ".tmp").mkdir(parents=True)
        hand_over(home, image.uid)
        return self.launch(image, home=home)

    def _drop(self, launcher: LauncherProcess) -> None:
        launcher.discard()
        if launcher.confined and launcher.home.parent == self.slot_root:
            shutil.rmtree(launcher.home, ignore_errors=True)  # never handed a subtask: still empty
