"""Reusable sandbox executors: one sandboxed process serves many subtasks of one plugin image and tenant.

A fresh sandbox per attempt costs ~50 ms of CPU (bwrap, a Python start, the
plugin's import), more than a short subtask itself. An executor is started like a
launcher (same view, rlimits, seccomp, uid), imports the plugin once, and then
forks a process per subtask inside its sandbox (workers/sandbox_zygote.py): each
subtask starts from the plugin's state after its import, in a fresh workspace,
with a private /tmp, and nothing it started outlives it. Executors are keyed by
plugin image (name, version, permissions, grants, uid) *and tenant*: two tenants
never share one. One is recycled after `sandbox_executor_subtasks` subtasks,
after any subtask that did not succeed (failure, timeout, cancel, kill, lost
lease), when its processes hold more than `sandbox_executor_max_rss_mb`, and when
idle for `sandbox_executor_idle_s`. A manifest with `isolation: per_attempt` never
gets one.

Folders (W = the workspace root). An executor's view is fixed when it starts, so
each executor has a writable root `W/.sandbox/x-<id>` (R) and, under bwrap, a
mirror `W/.sandbox/i-<id>` (I) bound read-only *at W itself*. For a subtask the
worker makes a fresh folder `R/<slot>`, links `W/.sandbox/<slot>` to it (on the
host, and in I under bwrap) and names the subtask's workspace `W/.sandbox/<slot>`,
exactly as a warm launcher's; the job's `W/<job>/<subtask>` links there. Its
inputs (files and folders its args name inside its job's folders) are hard-linked
into I at the same paths (a copy where a link cannot be made), so the plugin opens
them by the paths the job knows, read-only. When the subtask has ended the worker
moves `R/<slot>` to `W/.sandbox/<slot>` and empties I and R: a later subtask of the
executor finds nothing of it. Under Landlock (no mount namespace) a subtask with
inputs runs in a one-shot launcher instead; without any file confinement inputs
are read where they are.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from edgefleet.plugin_manifest import Isolation
from edgefleet.settings import Settings
from workers.sandbox import LauncherProcess, PluginImage, SandboxPolicy, hand_over

log = logging.getLogger(__name__)

SLOT_DIR = ".sandbox"
ETC_DIR = ".sandbox-etc"


@dataclass
class Slot:
    """One subtask's place in an executor."""

    workspace: Path  # what the plugin is told (W/.sandbox/<slot>): a link while it runs, its folder after
    folder: Path  # where its files are while it runs: R/<slot>
    job_link: Path  # W/<job>/<subtask>
    mirrored: list[Path] = field(default_factory=list)

    def host_paths(self, value: Any) -> Any:
        """`value` with paths the plugin saw through its folder (getcwd, realpath) named as after the move."""
        inner, outer = str(self.folder), str(self.workspace)
        if isinstance(value, str):
            return outer + value[len(inner) :] if value == inner or value.startswith(inner + "/") else value
        if isinstance(value, dict):
            return {k: self.host_paths(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.host_paths(v) for v in value]
        return value


@dataclass
class Executor:
    launcher: LauncherProcess
    tenant: str
    key: tuple[str, str]
    root: Path  # R, bound writable
    mirror: Path | None  # I, bound read-only at the workspace root (bwrap only)
    workspace_root: Path
    served: int = 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.launcher.proc.pid

    def alive(self) -> bool:
        return self.launcher.alive()

    def rss_bytes(self) -> int:
        try:
            root = psutil.Process(self.launcher.proc.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            return 0

    def open_slot(self, job_dir: Path, subtask_id: str, inputs: list[Path]) -> Slot:
        name = uuid.uuid4().hex
        folder = self.root / name
        (folder / ".tmp").mkdir(parents=True)
        hand_over(folder, self.launcher.image.uid)
        slot = Slot(self.workspace_root / SLOT_DIR / name, folder, job_dir / subtask_id)
        slot.workspace.symlink_to(folder, target_is_directory=True)
        if self.mirror is not None:
            inside = self.mirror / SLOT_DIR / name
            inside.symlink_to(folder, target_is_directory=True)
            slot.mirrored.append(inside)
            for path in inputs:
                slot.mirrored.append(self._mirror_input(path))
        job_dir.mkdir(parents=True, exist_ok=True)
        slot.job_link.symlink_to(slot.workspace, target_is_directory=True)
        return slot

    def _mirror_input(self, path: Path) -> Path:
        assert self.mirror is not None
        target = self.mirror / path.relative_to(self.workspace_root)
        real = path.resolve()
        _traversable_folders(self.mirror, target.parent)
        if real.is_dir():
            shutil.copytree(real, target, symlinks=True, copy_function=_link_or_copy, dirs_exist_ok=True)
        elif not target.exists():
            _link_or_copy(str(real), str(target))
        return target

    def close_slot(self, slot: Slot) -> None:
        """Move the subtask's folder out of the executor's view and empty what it could see."""
        slot.workspace.unlink(missing_ok=True)
        if slot.folder.is_dir():
            slot.folder.rename(slot.workspace)
        else:
            slot.workspace.mkdir(exist_ok=True)
        for leftover in self.root.iterdir():  # anything written beside its folder (same-uid workers)
            _remove(leftover)
        if self.mirror is not None:
            for entry in self.mirror.iterdir():
                if entry.name != SLOT_DIR:
                    _remove(entry)
            for entry in (self.mirror / SLOT_DIR).iterdir():
                if entry.name != self.root.name:
                    _remove(entry)


def _traversable_folders(top: Path, folder: Path) -> None:
    """`folder` and its parents below `top`, each one the sandbox uid may walk through."""
    missing = [p for p in [folder, *folder.parents] if top in p.parents and not p.exists()]
    for path in reversed(missing):
        path.mkdir()
        path.chmod(0o755)


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or a kernel that protects hard links to others' files
        shutil.copy2(src, dst)
    return dst


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _within(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def named_inputs(args: Any, workspace_root: Path, readable: list[Path]) -> list[Path]:
    """Absolute paths in `args` (strings anywhere inside) below the workspace root whose real
    place is inside the job's readable folders: what an executor's mirror must show."""
    roots = [root.resolve() for root in readable]
    found: dict[Path, None] = {}
    for text in _strings(args):
        if not text.startswith("/"):
            continue
        path = Path(os.path.normpath(text))
        if workspace_root not in path.parents:
            continue
        real = path.resolve()
        if real.exists() and _within(real, roots):
            found[path] = None
    # A folder covers what it holds.
    return [p for p in found if not any(other in p.parents for other in found)]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for inner in value.values():
            yield from _strings(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _strings(inner)


class Executors:
    """The idle executors of one worker process, at most `sandbox_executors`, least recently used stopped."""

    def __init__(self, settings: Settings, policy: SandboxPolicy | None, workspace_root: Path) -> None:
        self.max_subtasks = settings.sandbox_executor_subtasks
        self.idle_s = settings.sandbox_executor_idle_s
        self.max_rss = settings.sandbox_executor_max_rss_mb * 2**20
        self.capacity = settings.sandbox_executors
        self.policy = policy
        self.bwrap = policy.bwrap if policy else None
        self.workspace_root = workspace_root
        self._idle: OrderedDict[tuple[str, str], list[Executor]] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def serves(self, isolation: Isolation, image: PluginImage, workspace: Path, has_inputs: bool) -> bool:
        """Whether an executor may run this attempt; else a one-shot launcher does."""
        if self.max_subtasks <= 0 or isolation is Isolation.per_attempt:
            return False
        if workspace.exists() or workspace.is_symlink():
            return False  # an earlier attempt's files: only a launcher started for it binds them
        return not (has_inputs and image.landlock and self.bwrap is None)

    def take(self, image: PluginImage, tenant: str) -> tuple[Executor, bool]:
        """An idle executor of this image and tenant (True), or a new one (False)."""
        key = (image.key, tenant)
        with self._lock:
            waiting = self._idle.get(key, [])
            while waiting:
                executor = waiting.pop()
                if not waiting:
                    del self._idle[key]
                if executor.alive():
                    return executor, True
                self._retire(executor)
                waiting = self._idle.get(key, [])
        return self._start(image, tenant, key), False

    def give_back(self, executor: Executor, *, reusable: bool) -> None:
        """After a subtask: park the executor for the next one, or stop it (see the module's docstring)."""
        executor.served += 1
        executor.last_used = time.monotonic()
        if not reusable or not executor.alive() or executor.served >= self.max_subtasks:
            self._retire(executor)
            return
        if executor.rss_bytes() > self.max_rss:
            log.info("sandbox executor recycled: resident memory over the limit", extra={"pid": executor.pid})
            self._retire(executor)
            return
        evicted: list[Executor] = []
        with self._lock:
            self._idle.setdefault(executor.key, []).append(executor)
            self._idle.move_to_end(executor.key)
            while sum(len(group) for group in self._idle.values()) > self.capacity:
                oldest_key, oldest = next(iter(self._idle.items()))
                evicted.append(oldest.pop(0))
                if not oldest:
                    del self._idle[oldest_key]
            if self._sweeper is None:
                self._sweeper = threading.Thread(target=self._sweep, name="executor-sweeper", daemon=True)
                self._sweeper.start()
        for old in evicted:
            self._retire(old)

    def idle(self) -> list[Executor]:
        with self._lock:
            return [executor for group in self._idle.values() for executor in group]

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            idle = [executor for group in self._idle.values() for executor in group]
            self._idle.clear()
        for executor in idle:
            self._retire(executor)

    def _sweep(self) -> None:
        """Stop executors idle for longer than `idle_s`."""
        while not self._stop.wait(min(self.idle_s / 2, 5.0)):
            now = time.monotonic()
            stale: list[Executor] = []
            with self._lock:
                for key in list(self._idle):
                    group = self._idle[key]
                    stale += [e for e in group if now - e.last_used > self.idle_s]
                    group[:] = [e for e in group if now - e.last_used <= self.idle_s]
                    if not group:
                        del self._idle[key]
            for executor in stale:
                self._retire(executor)

    def _start(self, image: PluginImage, tenant: str, key: tuple[str, str]) -> Executor:
        name = uuid.uuid4().hex[:16]
        slots = self.workspace_root / SLOT_DIR
        root = slots / f"x-{name}"
        # Root-owned (for a root worker): the plugin can write only inside its subtask's folder.
        root.mkdir(parents=True)
        root.chmod(0o755)
        mirror: Path | None = None
        if self.bwrap:
            mirror = slots / f"i-{name}"
            (mirror / SLOT_DIR / root.name).mkdir(parents=True)  # where R is bound, inside I
            for folder in (mirror, mirror / SLOT_DIR, mirror / SLOT_DIR / root.name):
                folder.chmod(0o755)
        isolation = self.policy.isolation(image) if self.policy else None
        launcher = LauncherProcess(
            image,
            bwrap=self.bwrap,
            home=root,
            isolation=isolation,
            etc_root=self.workspace_root / ETC_DIR,
            executor=True,
            mirror=(mirror, self.workspace_root) if mirror is not None else None,
        )
        return Executor(launcher, tenant, key, root, mirror, self.workspace_root)

    def _retire(self, executor: Executor) -> None:
        executor.launcher.discard()
        shutil.rmtree(executor.root, ignore_errors=True)
        if executor.mirror is not None:
            shutil.rmtree(executor.mirror, ignore_errors=True)
