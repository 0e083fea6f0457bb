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
lease), when its processes hold more than `sandbox_executor_max_rss_mb` (read after
its first subtask, then every RSS_EVERY-th, and after each once over half of it), and when
idle for `sandbox_executor_idle_s`. A manifest with `isolation: per_attempt` never
gets one.

Folders (W = the workspace root). A subtask's workspace is `W/.sandbox/<slot>`,
linked from `W/<job>/<subtask>`, as a warm launcher's: the path the plugin works in
is the path its files keep, so what it records (a manifest naming its files by
their resolved paths) stays true for later steps. An executor's view is fixed when
it starts, so:
- under bwrap it binds a slots folder of its own (`W/.sandbox-x/<id>/slots`)
  writable *at `W/.sandbox`*, and a mirror (`.../view`) read-only at W. The worker
  makes each subtask's folder in the slots folder and, when the subtask has ended,
  moves it to `W/.sandbox/<slot>` on the host: out of the executor's view. A subtask
  with inputs (what a one-shot launcher would bind: its job's folder and the folders
  of earlier steps its links point to) finds them at the same paths: the job's
  folder hard-linked into the mirror, earlier steps' folders into the slots folder
  (read-only folders owned by the worker; a file the plugin's uid could change is
  copied, not linked). Both are emptied after the subtask.
- under Landlock (no mount namespace) its slots are made when it starts, each
  `W/.sandbox/<slot>` already, and each subtask's own Landlock layer keeps only its
  slot; after those slots it is recycled. A subtask with inputs runs in a one-shot
  launcher (Landlock cannot add a path to a running process).
- with no file confinement each subtask gets a fresh `W/.sandbox/<slot>` and reads
  its inputs where they are.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from edgefleet.plugin_manifest import Isolation
from edgefleet.settings import Settings
from edgefleet.workers.sandbox import LauncherProcess, PluginImage, SandboxPolicy, hand_over, tree_rss_bytes
from edgefleet.workers.sandbox_zygote import SPARE_NAME

log = logging.getLogger(__name__)

SLOT_DIR = ".sandbox"
ETC_DIR = ".sandbox-etc"
EXECUTOR_DIR = ".sandbox-x"  # one folder per executor: its slots folder and mirror (bwrap)
PRESET_LIST = "preset"  # a Landlock executor's slots, removed with it when its worker died


# Subtasks between two readings of an executor's memory while it holds under half its limit.
RSS_EVERY = 4
LANDLOCK_SLOTS = 64  # slots a Landlock executor is started with (then recycled): rules are made at start


@dataclass
class Slot:
    """One subtask's place in an executor."""

    workspace: Path  # what the plugin is told and where its files stay: W/.sandbox/<slot>
    folder: Path  # where its files are on this host while it runs (bwrap: in the slots folder)
    job_link: Path  # W/<job>/<subtask>


@dataclass
class Executor:
    launcher: LauncherProcess
    tenant: str
    key: tuple[str, str]
    workspace_root: Path
    home: Path  # its own folder (removed when it stops)
    slots_folder: Path | None = None  # bwrap: bound writable at W/.sandbox
    mirror: Path | None = None  # bwrap: bound read-only at W
    preset: list[Path] = field(default_factory=list)  # Landlock: the slots it may still use
    served: int = 0
    last_used: float = field(default_factory=time.monotonic)
    last_rss: int = 0  # bytes, at the last reading

    @property
    def pid(self) -> int:
        return self.launcher.proc.pid

    def alive(self) -> bool:
        return self.launcher.alive()

    def rss_bytes(self) -> int:
        self.last_rss = tree_rss_bytes(self.launcher.proc.pid, skip_name=SPARE_NAME)
        return self.last_rss

    @property
    def exhausted(self) -> bool:
        """A Landlock executor that has used every slot it was started with."""
        return self.mirror is None and self.launcher.confined and not self.preset

    def open_slot(self, job_link: Path, inputs: list[Path]) -> Slot:
        """The subtask's folder, behind `job_link` (see link_slot), made ready in this executor."""
        slots = self.workspace_root / SLOT_DIR
        workspace = Path(os.readlink(job_link))
        if self.preset:
            # Landlock: a slot its rules were made for (its executor may be applying them still,
            # by path: the slot keeps its name, the job's link is pointed at it instead).
            workspace = self.preset.pop(0)
            turned = job_link.with_name(f".{job_link.name}.link")
            turned.symlink_to(workspace, target_is_directory=True)
            turned.replace(job_link)
            for leftover in workspace.iterdir():  # its executor could write there; the subtask finds it empty
                _remove(leftover)
            (workspace / ".tmp").mkdir()
            folder = workspace
        else:
            folder = (self.slots_folder or slots) / workspace.name
            folder.mkdir(parents=True)
            (folder / ".tmp").mkdir()
        uid = self.launcher.image.uid
        if uid is not None:  # the folder holds just its .tmp: no walk (see hand_over)
            for path in (folder, folder / ".tmp"):
                os.chown(path, uid, uid, follow_symlinks=False)
        slot = Slot(workspace, folder, job_link)
        if self.mirror is not None and self.slots_folder is not None:
            for path in inputs:
                inside = path.resolve()
                if slots in inside.parents:  # an earlier step's folder: it sits under the slots bind
                    show(self.slots_folder / inside.relative_to(slots), inside, self.launcher.image.uid)
                else:
                    show(self.mirror / path.relative_to(self.workspace_root), inside, self.launcher.image.uid)
        return slot

    def close_slot(self, slot: Slot) -> None:
        """Move the subtask's folder out of the executor's view and empty what it could see."""
        if self.slots_folder is None or self.mirror is None:
            return  # its folder is where it stays, and no later subtask's layer allows it
        slot.folder.rename(slot.workspace)
        for leftover in self.slots_folder.iterdir():  # its inputs, anything written beside its folder
            _remove(leftover)
        empty_mirror(self.mirror)


def rss_reading_due(served: int, last_rss: int, limit: int) -> bool:
    """Whether to read an executor's memory after its `served`-th subtask: reading the process
    tree from /proc costs a short subtask's worker ~0.17 ms, so after the first subtask only
    every RSS_EVERY-th, or every one once the last reading held half the limit."""
    return served <= 1 or served % RSS_EVERY == 0 or last_rss * 2 > limit


def link_slot(workspace_root: Path, job_dir: Path, subtask_id: str) -> Path:
    """The job's link to the folder its subtask will work in, made before an executor is chosen
    (the job's folder names the subtask's workspace from the moment it runs); the link."""
    job_dir.mkdir(parents=True, exist_ok=True)
    link = job_dir / subtask_id
    link.symlink_to(workspace_root / SLOT_DIR / uuid.uuid4().hex, target_is_directory=True)
    return link


def show(target: Path, source: Path, uid: int | None) -> None:
    """Make `source` (a file or folder) appear at `target`, read-only for the sandbox uid: hard links,
    so the cost is a few system calls per file, not its size; a copy where a link would let the
    plugin change the original (a file its own uid owns or may write) or cannot be made."""
    _traversable_folders(target.parent)
    if source.is_dir():
        shutil.copytree(source, target, symlinks=True, copy_function=_linker(uid), dirs_exist_ok=True)
        for root, dirs, _files in os.walk(target):
            for name in dirs:
                if not os.path.islink(os.path.join(root, name)):  # a job's link to a step's folder
                    os.chmod(os.path.join(root, name), 0o555)
        target.chmod(0o555)
    elif not target.exists():
        _linker(uid)(str(source), str(target))


def empty_mirror(mirror: Path) -> None:
    """Everything out of an executor's mirror but the mount point of its slots folder."""
    for entry in mirror.iterdir():
        if entry.name != SLOT_DIR:
            _remove(entry)


def _orphans(home: Path) -> list[Path]:
    """Subtask folders in an executor's slots folder (the inputs it was shown are read-only copies)."""
    try:
        return [p for p in (home / "slots").iterdir() if p.is_dir() and os.stat(p).st_mode & 0o200]
    except OSError:
        return []


def _traversable_folders(folder: Path) -> None:
    """`folder` and its missing parents, each one the sandbox uid may walk through."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    for path in reversed(missing):
        path.mkdir()
        path.chmod(0o755)


def _linker(uid: int | None) -> Callable[[str, str], str]:
    me = os.getuid() if uid is None else uid

    def link_or_copy(src: str, dst: str) -> str:
        info = os.lstat(src)
        writable = info.st_uid == me or info.st_mode & 0o002 or (info.st_gid == me and info.st_mode & 0o020)
        if writable:
            shutil.copy2(src, dst)
            os.chmod(dst, info.st_mode & 0o555)
            return dst
        return _link_or_copy(src, dst)

    return link_or_copy


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or a kernel that protects hard links to others' files
        shutil.copy2(src, dst)
    return dst


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for root, dirs, _files in os.walk(path):  # read-only folders (inputs shown): a non-root worker
            for name in dirs:  # cannot empty them unless they are its to write again
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), 0o755)
        path.chmod(0o755)
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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
        self._remove_stale()

    def _remove_stale(self) -> None:
        """Folders of executors whose worker process is gone (killed, or ended without stopping
        them: they died with it, their folders stayed), and the slots they never used."""
        homes = self.workspace_root / EXECUTOR_DIR
        try:
            entries = list(homes.iterdir())
        except OSError:
            return
        for home in entries:
            owner = home.name.split("-", 1)[0]
            if not owner.isdigit() or psutil.pid_exists(int(owner)):
                continue
            for folder in _orphans(home):  # subtasks it was running: their folders to their place
                try:
                    folder.rename(self.workspace_root / SLOT_DIR / folder.name)
                except OSError:
                    pass
            try:
                unused = (home / PRESET_LIST).read_text().split()
            except OSError:
                unused = []
            for name in unused:
                try:
                    (self.workspace_root / SLOT_DIR / name).rmdir()  # only if no subtask used it
                except OSError:
                    pass
            shutil.rmtree(home, ignore_errors=True)

    def recover(self, job_link: Path) -> None:
        """An earlier attempt's folder left in an executor's slots folder (its worker process died
        mid-subtask): moved to where the job's link points, so a new attempt finds its files."""
        if not job_link.is_symlink() or job_link.exists():
            return
        target = Path(os.readlink(job_link))
        for home in (self.workspace_root / EXECUTOR_DIR).glob("*"):
            left = home / "slots" / target.name
            if left.is_dir():
                try:
                    left.rename(target)
                    return
                except OSError:
                    continue
        target.mkdir(parents=True, exist_ok=True)  # nothing left of it: an empty workspace

    def serves(
        self, isolation: Isolation, image: PluginImage, workspace: Path, has_inputs: bool, *, fresh: bool | None = None
    ) -> bool:
        """Whether an executor may run this attempt; else a one-shot launcher does. `fresh`: the
        caller knows nothing is at `workspace` (else it is looked at)."""
        if self.max_subtasks <= 0 or isolation is Isolation.per_attempt:
            return False
        if not fresh and (workspace.exists() or workspace.is_symlink()):
            return False  # an earlier attempt's files: only a launcher started for it binds them
        return not (has_inputs and image.landlock and self.bwrap is None)

    def _isolation(self, image: PluginImage) -> str | None:
        """What confines its subtasks, for their records (see workers/sandbox_shared.py)."""
        if self.policy is None:
            return None
        shared = image.shared and self.policy.bwrap is not None
        return self.policy.isolation(image) + ("+shared-process" if shared else "")

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
        if not reusable or not executor.alive() or executor.served >= self.max_subtasks or executor.exhausted:
            self._retire(executor)
            return
        if rss_reading_due(executor.served, executor.last_rss, self.max_rss) and executor.rss_bytes() > self.max_rss:
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
        # Named after the owner's pid: see _remove_stale. Owned by the worker: the plugin's uid
        # may write only in its subtask's folder.
        home = self.workspace_root / EXECUTOR_DIR / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        _traversable_folders(home)
        slots = self.workspace_root / SLOT_DIR
        _traversable_folders(slots)
        slots_folder = mirror = None
        preset: list[Path] = []
        if self.bwrap:
            slots_folder, mirror = home / "slots", home / "view"
            _traversable_folders(slots_folder)
            _traversable_folders(mirror / SLOT_DIR)  # where the slots folder is bound
        elif image.landlock:
            preset = [slots / uuid.uuid4().hex for _ in range(min(self.max_subtasks, LANDLOCK_SLOTS))]
            (home / PRESET_LIST).write_text("\n".join(p.name for p in preset))
            for slot in preset:
                slot.mkdir()
                hand_over(slot, image.uid)
        launcher = LauncherProcess(
            image,
            bwrap=self.bwrap,
            home=slots if self.bwrap else home,
            isolation=self._isolation(image),
            etc_root=self.workspace_root / ETC_DIR,
            executor=True,
            mirror=(mirror, self.workspace_root) if mirror is not None else None,
            home_source=slots_folder,
            slots=preset,
        )
        return Executor(launcher, tenant, key, self.workspace_root, home, slots_folder, mirror, preset)

    def _retire(self, executor: Executor) -> None:
        executor.launcher.discard()
        for slot in executor.preset:  # never used
            shutil.rmtree(slot, ignore_errors=True)
        shutil.rmtree(executor.home, ignore_errors=True)
