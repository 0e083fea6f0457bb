"""The sandbox's parent side: start a plugin in a limited child process and watch it.

The trust model (DESIGN.md): a submitter is not trusted, and neither is a plugin
beyond its manifest. Every launcher:
- runs as an unprivileged uid when the worker is root (one uid per plugin, from
  `sandbox_uid`; the launcher drops to it before it reads anything), with no
  capabilities, so file modes, `RLIMIT_NPROC` and ptrace rules bind it;
- sees only: the system and Python read-only, a minimal `/etc` (no secrets),
  its code, its job's inputs read-only, its workspace writable, and the folders
  an operator granted for `file_system_read`/`file_system_write`
  (edgefleet.plugin_paths) — never the data dir, tokens, Redis files,
  `/etc/edgefleet` or other jobs' workspaces. With `bwrap` that is a mount
  namespace (plus pid, ipc, uts, net namespaces); without it, Landlock where the
  kernel has it;
- gets rlimits (memory, CPU time, file size, processes), a scrubbed environment,
  its own session and process group, a seccomp filter (no process creation
  without `subprocess`, no IP sockets without `network`, never ptrace or
  process_vm_*), a wall-clock deadline, a workspace quota and a cap on what it
  may send back.
`isolation` in the subtask's record says which of these held.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import psutil

import edgefleet
from edgefleet.plugin_manifest import Isolation, Limits, Permission
from edgefleet.plugin_paths import PathGrants, grants_for
from edgefleet.settings import Settings
from edgefleet.workers import sandbox_protocol as protocol
from edgefleet.workers.pipe_lines import EOF, PipeLines
from edgefleet.workers.sandbox_net import (
    RESOLV_CONF,
    SandboxNetwork,
    SandboxNetworkError,
    network_available,
    read_child_pid,
)

if TYPE_CHECKING:
    from edgefleet.plugin_catalog import LoadedPlugin

log = logging.getLogger(__name__)

STDERR_KEEP = 4000
LAUNCHER_SCRIPT = Path(__file__).resolve().parent / "sandbox_launcher.py"
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64")
# What of the host's /etc a plugin sees: libraries, certificates, time zone and name
# service configuration; never shadow, ssh keys, /etc/edgefleet or anything else.
ETC_ENTRIES = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "ssl",
    "ca-certificates",
    "pki",
    "alternatives",
    "mime.types",
    "fonts",
    "gai.conf",
    "host.conf",
    "protocols",
    "services",
)
ETC_WITH_NETWORK = ("resolv.conf",)
# What a scrubbed environment keeps: enough for Python, locale and tools to work.
ENV_KEEP = ("PATH", "LANG", "LC_ALL", "TZ")
PIPE_OVERHEAD = 64 * 1024  # room for the protocol's own fields around an output


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def _code_roots() -> list[Path]:
    """Where the launcher's own imports live: the folder holding the edgefleet package."""
    return [Path(edgefleet.__file__).resolve().parent.parent]


def _code_packages() -> list[Path]:
    """The folders the launcher reads code from. In a checkout `edgefleet/workers` is a link to the
    top-level `workers/` folder (the design card's layout), so the link's target is bound too."""
    package = Path(edgefleet.__file__).resolve().parent
    return sorted({package, (package / "workers").resolve()})


def _import_path() -> list[str]:
    entries = [str(p) for p in _code_roots()]
    for entry in sys.path:
        if entry and Path(entry).is_dir() and entry not in entries:
            entries.append(entry)
    return entries


def _python_roots() -> list[Path]:
    roots = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), Path(sys.executable).resolve().parent}
    return sorted(roots)


def _others_can_reach(path: Path) -> bool:
    """Whether a different unprivileged uid may traverse to `path` (search permission on each ancestor)."""
    for folder in [path, *path.parents]:
        try:
            if not folder.stat().st_mode & stat.S_IXOTH:
                return False
        except FileNotFoundError:
            continue
    return True


def _bwrap_works(bwrap: str) -> bool:
    """Whether bwrap can make the namespaces this box's sandboxes need (tried once per worker process)."""
    probe = [bwrap, "--die-with-parent", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--ro-bind", "/", "/"]
    if os.geteuid() != 0:
        probe.append("--unshare-user")
    try:
        return subprocess.run([*probe, "--", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass(frozen=True)
class SandboxPolicy:
    """This worker's sandbox settings: one per worker process, shared by all its launchers."""

    settings: Settings
    bwrap: str | None
    switch_uid: bool
    landlock_abi: int
    why_same_uid: str = ""
    seccomp: bool = True  # libseccomp present: without it, process creation and sockets stay allowed
    # image_of's answers by manifest object (kept alive beside its image, so an id is never reused):
    # working out the grants walks the settings' paths, and a worker asks once per subtask.
    _images: dict[int, tuple[object, PluginImage]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> SandboxPolicy:
        bwrap = bwrap_path() if settings.sandbox != "process" else None
        if bwrap and not _bwrap_works(bwrap):
            # A container without user namespaces (Docker's default seccomp profile): Landlock instead.
            log.warning("bubblewrap cannot create its namespaces here; sandboxing without it", extra={"bwrap": bwrap})
            bwrap = None
        switch_uid, why = os.geteuid() == 0, ""
        if switch_uid and bwrap is None:
            # Without a mount namespace the sandbox uid walks the real tree to its code and workspace.
            needed = [settings.effective_workspace_dir, *_python_roots(), *_code_roots()]
            blocked = [str(p) for p in needed if not _others_can_reach(p)]
            if blocked:
                switch_uid = False
                why = f"another uid cannot reach {', '.join(blocked)}"
                log.warning(
                    "plugins run as the worker's uid: give others search (x) permission on the folders above, "
                    "or install bubblewrap",
                    extra={"blocked": blocked},
                )
        abi = 0
        if bwrap is None:
            from edgefleet.workers.landlock import abi_version

            abi = abi_version()
        from edgefleet.workers.seccomp_filter import available

        seccomp = available()
        if not seccomp:
            log.warning("libseccomp is missing: plugins run without the seccomp filter (see `isolation`)")
        return cls(
            settings=settings, bwrap=bwrap, switch_uid=switch_uid, landlock_abi=abi, why_same_uid=why, seccomp=seccomp
        )

    def uid_of(self, plugin: str) -> int | None:
        """A stable uid per plugin: files it keeps in a granted folder stay its own across runs."""
        if not self.switch_uid:
            return None
        return self.settings.sandbox_uid + zlib.crc32(plugin.encode()) % self.settings.sandbox_uid_span

    @property
    def max_output_bytes(self) -> int:
        return self.settings.sandbox_max_output_kb * 1024

    def image_of(self, plugin: LoadedPlugin) -> PluginImage:
        cached = self._images.get(id(plugin.manifest))
        if cached is not None and cached[0] is plugin.manifest and cached[1].folder == plugin.folder:
            return cached[1]
        image = self._image_of(plugin)
        self._images[id(plugin.manifest)] = (plugin.manifest, image)
        return image

    def _image_of(self, plugin: LoadedPlugin) -> PluginImage:
        manifest = plugin.manifest
        permissions = tuple(manifest.permissions)
        return PluginImage(
            plugin=manifest.name,
            folder=plugin.folder,
            entry_point=manifest.entry_point,
            permissions=permissions,
            limits=manifest.limits,
            grants=grants_for(self.settings, manifest.name, frozenset(permissions)),
            uid=self.uid_of(manifest.name),
            max_output_bytes=self.max_output_bytes,
            landlock=self.bwrap is None and self.landlock_abi > 0,
            lan=Permission.network_lan in permissions and manifest.name in self.settings.sandbox_lan_plugins,
            seccomp=self.seccomp,
            shared=manifest.isolation is Isolation.shared,
        )

    def isolation(self, image: PluginImage) -> str:
        parts = ["bwrap" if self.bwrap else ("landlock" if image.landlock else "fs-unconfined")]
        if image.uid is not None:
            parts.append(f"uid={image.uid}")
        else:
            parts.append("uid=root-nocaps" if os.geteuid() == 0 and not self.bwrap else "uid=worker")
        parts += ["seccomp" if self.seccomp else "no-seccomp", "rlimits"]
        return "+".join(parts)


@dataclass(frozen=True)
class PluginImage:
    """What a launcher prepares before it knows its subtask: it depends on the manifest and the
    worker's policy only, so a launcher can be started (limits, seccomp, plugin imported) ahead."""

    plugin: str
    folder: Path
    entry_point: str
    permissions: tuple[Permission, ...]
    limits: Limits
    grants: PathGrants = field(default_factory=lambda: PathGrants((), (), ()))
    uid: int | None = None
    max_output_bytes: int = 1024 * 1024
    landlock: bool = False
    lan: bool = False  # `network_lan`, allowed by the operator: private addresses stay reachable
    seccomp: bool = True
    # `isolation: shared`: an executor runs its subtasks in its own process (under bwrap only).
    shared: bool = False

    def prepare_message(self) -> protocol.Prepare:
        return {
            "type": "prepare",
            "plugin": self.plugin,
            "folder": str(self.folder),
            "entry_point": self.entry_point,
            "permissions": sorted(p.value for p in self.permissions),
            "limits": self.limits.model_dump(),
            "max_output_bytes": self.max_output_bytes,
            "seccomp": self.seccomp,
            "shared": self.shared,
        }

    @classmethod
    def of(cls, plugin: LoadedPlugin) -> PluginImage:
        """The image with no grants, no uid switch and no Landlock (tests of the launcher itself)."""
        manifest = plugin.manifest
        return cls(
            plugin=manifest.name,
            folder=plugin.folder,
            entry_point=manifest.entry_point,
            permissions=tuple(manifest.permissions),
            limits=manifest.limits,
            shared=manifest.isolation is Isolation.shared,
        )

    @cached_property
    def key(self) -> str:
        """Identifies launchers that are interchangeable (the warm pool's key)."""
        grants = [[str(p) for p in self.grants.read], [str(p) for p in self.grants.write]]
        return json.dumps([self.prepare_message(), grants, self.uid, self.landlock, self.lan], sort_keys=True)

    @property
    def networked(self) -> bool:
        return bool({Permission.network, Permission.network_lan} & set(self.permissions))

    @property
    def sees_granted_folders(self) -> bool:
        return bool(self.grants.read or self.grants.write)


@dataclass(frozen=True)
class SandboxView:
    """What one launcher may see, for both ways of enforcing it (bwrap binds, Landlock rules)."""

    read: tuple[Path, ...]  # read-only trees
    write: tuple[Path, ...]  # writable trees (its workspace first)
    list_only: tuple[Path, ...]  # folders it may list but not read below (the code roots)
    masked: tuple[Path, ...]  # protected folders inside a visible tree: hidden again

    @classmethod
    def of(cls, image: PluginImage, workspace: Path, readable: Sequence[Path]) -> SandboxView:
        etc = [Path("/etc") / name for name in ETC_ENTRIES]
        if image.networked:
            etc += [Path("/etc") / name for name in ETC_WITH_NETWORK]
        read = [
            *(Path(d) for d in SYSTEM_DIRS),
            *etc,
            *_python_roots(),
            *_code_packages(),
            image.folder.resolve(),
            *readable,
            *image.grants.read,
        ]
        visible = [*read, *_code_roots()]
        protected = image.grants.protected
        masked = [p for p in protected if any(v in p.parents for v in visible) and p.exists()]
        return cls(
            read=tuple(dict.fromkeys(read)),
            write=(workspace, *image.grants.write),
            list_only=tuple(_code_roots()),
            masked=tuple(masked),
        )

    def landlock_message(self, *, executor: bool = False) -> protocol.LandlockRules:
        devices = ["/dev/null", "/dev/zero", "/dev/full", "/dev/urandom", "/dev/random"]
        # An executor's subtasks are processes forked later, whose /proc entries do not exist yet:
        # its own layer allows /proc, and each subtask's layer narrows that to its /proc/self.
        proc = "/proc" if executor else "/proc/self"
        return {
            "read": [str(p) for p in self.read] + devices[1:] + [proc],
            "write": [str(p) for p in self.write] + ["/dev/null"],
            "list": [str(p) for p in self.list_only],
        }


@dataclass
class LaunchSpec:
    image: PluginImage
    action: str
    args: dict[str, Any]
    job_id: str
    subtask_id: str
    attempt: int
    workspace: Path
    job_dir: Path
    timeout: float
    checkpoint: Any = None
    # Where the workspace's files are on this host while it runs, when that is not `workspace`
    # (an executor under bwrap: its slots folder is bound where the plugin sees its workspace).
    folder: Path | None = None

    @property
    def host_folder(self) -> Path:
        return self.folder if self.folder is not None else self.workspace

    def run_message(self) -> protocol.Run:
        return {
            "type": "run",
            "action": self.action,
            "args": self.args,
            "job_id": self.job_id,
            "subtask_id": self.subtask_id,
            "attempt": self.attempt,
            "workspace": str(self.workspace),
            "timeout": self.timeout,
            "checkpoint": self.checkpoint,
        }


@dataclass
class SandboxOutcome:
    # succeeded | failed | cancelled | timeout | lost (killed from outside, e.g. the OOM killer:
    # not the plugin's fault, so the runner gives it a new attempt whatever its retries say)
    outcome: str
    output: Any = None
    error: str = ""
    retryable: bool = True
    isolation: str = ""
    cpu_seconds: float = 0.0
    max_rss_mb: float = 0.0


def child_env(home: Path) -> dict[str, str]:
    """The launcher's scrubbed environment; HOME and TMPDIR move to the workspace when its run arrives."""
    env = {k: os.environ[k] for k in ENV_KEEP if k in os.environ}
    env.update(
        {
            "HOME": str(home),
            "TMPDIR": str(home),
            # With `-S` the child skips site's .pth processing (tens of ms per start, and code
            # we did not choose); it gets exactly our import path instead.
            "PYTHONPATH": os.pathsep.join(_import_path()),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            # One thread per numeric library: threads count against the process limit.
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
        }
    )
    return env


def minimal_etc(root: Path, uid: int | None) -> Path:
    """A generated passwd/group/hosts/nsswitch for the sandbox: who it is, and nothing of the host's users."""
    folder = root / f"etc-{uid if uid is not None else os.getuid()}"
    if folder.is_dir():
        return folder
    me = uid if uid is not None else os.getuid()
    staging = root / f".etc-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    files = {
        "passwd": f"root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
        f"sandbox:x:{me}:{me}:edgefleet plugin:/nonexistent:/usr/sbin/nologin\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "group": f"root:x:0:\nsandbox:x:{me}:\nnogroup:x:65534:\n",
        "hosts": "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
        "resolv.conf": RESOLV_CONF,  # slirp4netns's DNS forwarder, the only name server it may reach
    }
    for name, text in files.items():
        (staging / name).write_text(text)
        (staging / name).chmod(0o644)
    staging.chmod(0o755)
    try:
        staging.rename(folder)
    except OSError:  # another worker process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _parents(paths: Sequence[Path]) -> list[str]:
    """bwrap makes missing mount points mode 0700, which the sandbox uid could not cross: make them 0755."""
    folders: dict[Path, None] = {}
    for path in paths:
        for parent in reversed(path.parents):
            if parent != Path("/"):
                folders[parent] = None
    args: list[str] = []
    for folder in folders:
        args += ["--perms", "0755", "--dir", str(folder)]
    return args


def bwrap_command(
    image: PluginImage,
    bwrap: str,
    workspace: Path,
    readable: Sequence[Path],
    etc_root: Path | None = None,
    mirror: tuple[Path, Path] | None = None,
    executor: bool = False,
    home_source: Path | None = None,
) -> list[str]:
    """The namespace view (see SandboxView): no user namespace when we are root, so the launcher
    itself can drop to its uid; every capability but setuid/setgid dropped for that step.

    `mirror` (an executor): (folder, workspace root): the folder is bound read-only where the
    workspace root is, so that what the worker links into it for each subtask (its inputs, a
    link to its workspace) appears at the paths the job knows them by. An `executor` is its pid
    namespace's init: a subtask it forked cannot kill it (init takes no signal it has no handler
    for from inside), so a plugin that kills its parent ends only its own subtask."""
    perms = set(image.permissions)
    cmd = [
        bwrap,
        "--die-with-parent",
        "--new-session",
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-uts",
        "--unshare-cgroup-try",
    ]
    if executor:
        cmd.append("--as-pid-1")
    if os.geteuid() != 0:
        cmd.append("--unshare-user")
    # Always a network namespace of its own; with `network`, slirp4netns connects it to the
    # internet but not to the host, link-local or private addresses (workers/sandbox_net.py).
    cmd.append("--unshare-net")
    # First: later binds below /tmp (pytest's folders, a data dir there) land on top of this tmpfs.
    cmd += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    view = SandboxView.of(image, workspace, readable)
    late = [*readable, *view.write]  # bound after the masks, which may cover their parents
    cmd += _parents(list(view.read) + list(view.list_only) + late)
    for path in view.read:
        cmd += ["--ro-bind-try", str(path), str(path)]
    for root in view.list_only:
        if root not in view.read:
            cmd += ["--ro-bind", str(root), str(root)]
    for path in view.masked:
        cmd += ["--tmpfs", str(path)]
    if view.masked:
        cmd += _parents(late)
    if mirror is not None:
        cmd += ["--ro-bind", str(mirror[0]), str(mirror[1])]
    # The job's inputs lie in the (masked) workspace dir: bound again on top of the mask.
    for path in readable:
        cmd += ["--ro-bind", str(path), str(path)]
    for path in view.write[1:]:
        cmd += ["--bind", str(path), str(path)]
    if etc_root is not None:
        generated = minimal_etc(etc_root, image.uid)
        names = ["passwd", "group", "hosts", "nsswitch.conf"]
        if image.networked:
            names.append("resolv.conf")
        for name in names:
            cmd += ["--ro-bind", str(generated / name), f"/etc/{name}"]
    if Permission.gpu_access in perms:
        for device in [*sorted(Path("/dev").glob("nvidia*")), Path("/dev/dri")]:
            if device.exists():
                cmd += ["--dev-bind", str(device), str(device)]
    # `home_source`: an executor's slots folder, bound where its subtasks' workspaces are.
    cmd += ["--bind", str(home_source or workspace), str(workspace), "--chdir", str(workspace)]
    cmd += ["--cap-drop", "ALL"]
    if image.uid is not None:
        cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]  # dropped with the uid switch
    return cmd


def hand_over(folder: Path, uid: int | None) -> None:
    """Make a workspace (and what an earlier attempt left in it) the sandbox uid's own."""
    if uid is None:
        return
    for root, dirs, files in os.walk(folder):
        os.chown(root, uid, uid, follow_symlinks=False)
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), uid, uid, follow_symlinks=False)


def share_read_only(folder: Path) -> None:
    """After an attempt: its files readable by later steps, which run as other uids."""
    for root, _dirs, files in os.walk(folder):
        try:
            os.chmod(root, os.stat(root).st_mode | 0o555)
            for name in files:
                path = os.path.join(root, name)
                if not os.path.islink(path):
                    os.chmod(path, os.stat(path).st_mode | 0o444)
        except OSError:
            continue


def process_tree_pids(pid: int) -> list[int]:
    """`pid` and everything below it, read from /proc/<pid>/task/*/children: psutil's
    children(recursive=True) reads every process on the box, milliseconds on a busy one."""
    found: list[int] = []
    waiting = [pid]
    while waiting:
        current = waiting.pop()
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    waiting += [int(child) for child in f.read().split()]
        except OSError:
            continue
        found.append(current)
    return found


def process_tree(pid: int) -> list[psutil.Process]:
    """As `process_tree_pids`, as psutil processes (those still there)."""
    found: list[psutil.Process] = []
    for current in process_tree_pids(pid):
        try:
            found.append(psutil.Process(current))
        except psutil.Error:
            continue
    return found


def wait_ended(processes: list[psutil.Process], timeout: float) -> None:
    """Wait until each process has ended (exited: a zombie counts), at most `timeout` in all.

    Killed processes of a sandbox are not this process's children (bwrap's pid 1 is reparented
    when bwrap dies), so they stay zombies until whoever inherits them reaps them; psutil's
    wait_procs waits for the reaping, seconds under an init that reaps slowly, and a recycled
    executor held its last subtask's result that long. A pidfd becomes readable at the exit."""
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            if not process.is_running():  # gone, or the pid now names another process
                continue
            fd = os.pidfd_open(process.pid)
        except (ProcessLookupError, psutil.Error):
            continue
        except (OSError, AttributeError):  # no pidfd (Linux < 5.3): poll the status instead
            _poll_ended(process, deadline)
            continue
        try:
            select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)


def _poll_ended(process: psutil.Process, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.Error:
            return
        time.sleep(0.005)


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def tree_rss_bytes(pid: int, *, skip_name: str | None = None) -> int:
    """Resident memory of `pid` and its descendants, from /proc/<pid>/statm (no psutil objects:
    a worker reads it after every subtask of a reusable executor); without the processes named
    `skip_name` (an executor's spare, whose pages are the executor's own, shared)."""
    total = 0
    for current in process_tree_pids(pid):
        try:
            if skip_name is not None:
                with open(f"/proc/{current}/comm") as f:
                    if f.read().strip() == skip_name:
                        continue
            with open(f"/proc/{current}/statm") as f:
                total += int(f.read().split()[1]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            continue
    return total


def folder_size(folder: Path) -> int:
    """Bytes of the regular files below `folder` (links not followed)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


class LauncherProcess:
    """A sandboxed launcher started for one plugin image: limited, filtered and with the
    plugin imported, it waits on stdin for the one subtask it will run, then exits.

    `home` is its writable workspace (and its first working directory); `readable` is
    what it may read besides the system and Python.
    """

    def __init__(
        self,
        image: PluginImage,
        *,
        bwrap: str | None,
        home: Path,
        readable: Sequence[Path] = (),
        isolation: str | None = None,
        etc_root: Path | None = None,
        executor: bool = False,
        mirror: tuple[Path, Path] | None = None,
        home_source: Path | None = None,
        slots: Sequence[Path] = (),
    ) -> None:
        """An `executor` (workers/sandbox_executors.py) serves `run`s one after another; `home` is
        then where its subtasks' workspaces are: under bwrap `home_source` is bound there and `mirror`
        at the workspace root; under Landlock `slots` are the folders its subtasks will work in."""
        self.image = image
        self.home = home
        self.bwrap = bwrap
        self.serves_many = executor
        self._stderr: list[str] = []  # an executor's: one reader for its life, each run takes its part
        self.isolation = isolation or ("bwrap+seccomp+rlimits" if bwrap else "seccomp+rlimits")
        # -P: the script's folder (workers/) must not shadow modules; a path, not -m: runpy costs ~7 ms.
        launcher = [sys.executable, "-S", "-P", str(LAUNCHER_SCRIPT)]
        self.network: SandboxNetwork | None = None
        wants_network = bool(bwrap) and image.networked
        info_read, info_write = os.pipe() if wants_network else (-1, -1)
        if bwrap:
            info = ["--info-fd", str(info_write)] if wants_network else []
            cmd = bwrap_command(image, bwrap, home, readable, etc_root, mirror, executor, home_source)
            cmd += [*info, "--", *launcher]
        else:
            cmd = launcher
        env = {**child_env(home), "EDGEFLEET_SANDBOX": "bwrap" if bwrap else "process"}
        if image.uid is not None:
            env["EDGEFLEET_SANDBOX_UID"] = str(image.uid)
        prepare = image.prepare_message()
        if self.serves_many:
            prepare["serve"] = "many"
            prepare["executor_slots"] = [str(slot) for slot in slots]
        if image.landlock and not bwrap:
            view = SandboxView.of(image, home, readable)
            rules = view.landlock_message(executor=self.serves_many)
            if self.serves_many:  # its own folder is only its working directory: the slots are writable
                rules["write"] = [str(slot) for slot in slots] + rules["write"][1:]
            prepare["landlock"] = rules
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=str(home),
            text=True,
            start_new_session=True,  # its own process group: one signal reaches all it started
            pass_fds=(info_write,) if wants_network else (),
        )
        if wants_network:
            os.close(info_write)
            self._connect(info_read)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(prepare) + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout is not None
        # The protocol stream, read by whoever waits for a run (workers/pipe_lines.py).
        self.lines = PipeLines(self.proc.stdout.fileno(), image.max_output_bytes + PIPE_OVERHEAD)
        if self.serves_many:
            threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr
        for line in self.proc.stderr:
            self._stderr.append(line)
            if len(self._stderr) > 200:
                del self._stderr[:100]

    def _connect(self, info_read: int) -> None:
        """Give the launcher's namespace its filtered way out before any subtask reaches it."""
        try:
            why = network_available()
            if why:
                raise SandboxNetworkError(why)
            self.network = SandboxNetwork.attach(read_child_pid(info_read), allow_lan=self.image.lan)
            self.isolation += "+net=slirp-lan" if self.image.lan else "+net=slirp"
        except (SandboxNetworkError, OSError, ValueError) as exc:
            # Never the host's network instead: the plugin runs, and its connections fail.
            log.warning("sandbox network unavailable", extra={"plugin": self.image.plugin, "reason": str(exc)})
            self.isolation += "+net=none"
        finally:
            os.close(info_read)

    def release(self) -> None:
        """Stop what runs beside the launcher (its network helper) once it has ended."""
        if self.network is not None:
            self.network.close()
            self.network = None

    @property
    def confined(self) -> bool:
        """Whether its file view was fixed at start (then it serves only subtasks that fit it)."""
        return self.bwrap is not None or self.image.landlock

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL its whole process group (everything the plugin started) and reap it.

        An executor's subtask runs in a process of its own session (bwrap's --new-session) below
        the executor: it dies with its executor, but only once the kernel gets to it, so the
        whole tree is killed here and waited for, and a cancelled subtask has ended when this returns."""
        tree: list[psutil.Process] = []
        if self.proc.poll() is None:
            if self.serves_many:
                tree = process_tree(self.proc.pid)[1:]
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for process in tree:
                try:
                    process.kill()
                except psutil.Error:
                    pass
        self.proc.wait()
        wait_ended(tree, timeout=10)
        self.release()

    def discard(self) -> None:
        """Kill a launcher that will not run anything and close its pipes."""
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream:
                try:
                    stream.close()
                except OSError:
                    pass


class SandboxedRun:
    """One attempt in a launcher process. Its messages are read, and the progress and checkpoint
    callbacks run, on the thread that waits for it (`wait`, `stop`, `outcome`); model calls are
    answered on a thread each."""

    def __init__(
        self,
        spec: LaunchSpec,
        launcher: LauncherProcess,
        *,
        on_progress: Callable[[float, str], None],
        on_checkpoint: Callable[[Any], None],
        on_model_call: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        kill_grace: float = 3.0,
    ) -> None:
        self.spec = spec
        self.on_progress = on_progress
        self.on_checkpoint = on_checkpoint
        self.on_model_call = on_model_call
        self._stdin_lock = threading.Lock()
        self.kill_grace = kill_grace
        self.isolation = launcher.isolation
        self._launcher = launcher
        self._final: protocol.Final | None = None
        self._stderr: list[str] = []
        self._proc: subprocess.Popen[str] = launcher.proc
        self._cpu = 0.0
        self._rss = 0
        self._reading = False  # between `start` and the end of this run's messages
        self._stop_requested: str | None = None
        self._violation = ""  # a bound it broke (message size, workspace quota): the subtask's error
        self._run_ended: protocol.Ended | None = None  # an executor's report that this run's process ended

    def start(self) -> None:
        if self.spec.folder is None:  # an executor's slot was made ready by `Executor.open_slot`
            folder = self.spec.host_folder.resolve()
            (folder / ".tmp").mkdir(parents=True, exist_ok=True)
            hand_over(folder, self.spec.image.uid)
        if self._launcher.serves_many:
            self._launcher._stderr.clear()
            self._stderr = self._launcher._stderr  # its one reader's lines, from this run on
        self._write(self.spec.run_message())
        self._reading = True
        if not self._launcher.serves_many:
            threading.Thread(target=self._read_stderr, daemon=True).start()

    def _pump(self, timeout: float) -> bool:
        """Handle the run's messages as they come, for up to `timeout` seconds; True once there
        are no more (its executor said `ended`, the launcher closed its end, or broke a bound)."""
        deadline = time.monotonic() + timeout
        while self._reading:
            # Bounded: a plugin cannot make its worker buffer an endless line.
            line = self._launcher.lines.next(max(0.0, deadline - time.monotonic()))
            if line is None:
                return False
            if isinstance(line, str):
                self._handle(line)
            elif line is EOF:
                self._reading = False
            else:  # OVERSIZED
                limit = self._launcher.lines.limit
                self._violation = (
                    f"sent a message over {limit // 1024} KiB; return large results as files in the workspace"
                )
                self._reading = False
                self._launcher.kill()
        return True

    def _handle(self, line: str) -> None:
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            return
        kind = message.get("type")
        if kind == "progress":
            self.on_progress(float(message["fraction"]), str(message.get("message", "")))
        elif kind == "checkpoint":
            self.on_checkpoint(message.get("state"))
        elif kind == "model_call":
            threading.Thread(target=self._answer_model_call, args=(message,), daemon=True).start()
        elif kind in ("result", "error"):
            self._final = cast(protocol.Final, message)
        elif kind == "ended":
            self._run_ended = cast(protocol.Ended, message)
            self._reading = False  # the executor's next lines belong to its next run

    def _answer_model_call(self, message: dict[str, Any]) -> None:
        call_id = message.pop("id")
        message.pop("type")
        if self.on_model_call is None:
            reply = {"ok": False, "error": "this worker has no model layer"}
        else:
            reply = self.on_model_call(message)
        self._write({"type": "model_reply", "id": call_id, **reply})

    def _write(self, message: Mapping[str, Any]) -> None:
        if not self._proc.stdin:
            return
        with self._stdin_lock:
            try:
                self._proc.stdin.write(json.dumps(message) + "\n")
                self._proc.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass  # the plugin is gone; nothing to tell it

    def _read_stderr(self) -> None:
        assert self._proc.stderr
        for line in self._proc.stderr:
            self._stderr.append(line)
            if len(self._stderr) > 200:
                del self._stderr[:100]

    def running(self) -> bool:
        if self._launcher.serves_many:
            return self._reading and self._proc.poll() is None
        return self._proc.poll() is None

    def _tree_usage(self) -> tuple[float, int]:
        """CPU seconds and resident bytes of the launcher's whole process tree."""
        cpu = rss = 0.0
        for proc in process_tree(self._proc.pid):
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    cpu += times.user + times.system + times.children_user + times.children_system
                    rss += proc.memory_info().rss
            except psutil.Error:
                continue
        return cpu, int(rss)

    def sample(self) -> None:
        """CPU seconds and peak RSS of the whole process tree, for the subtask's record."""
        cpu, rss = self._tree_usage()
        if not self._launcher.serves_many:  # an executor's tree holds earlier runs: its `ended` says
            self._cpu = max(self._cpu, cpu)
        self._rss = max(self._rss, rss)
        quota = self.spec.image.limits.workspace_mb * 2**20
        used = folder_size(self.spec.host_folder)
        if used > quota and not self._violation:
            self._violation = f"exceeded its workspace quota ({self.spec.image.limits.workspace_mb} MB)"
            self.kill()

    def wait(self, timeout: float) -> bool:
        """True once the launcher has exited (an executor: once this run's process has ended).
        Waits on the protocol stream's end first: Popen.wait(timeout) polls with a back-off of
        up to 50 ms, a third of a short subtask."""
        deadline = time.monotonic() + timeout
        if not self._pump(timeout):
            return False
        if self._run_ended is not None:
            return True
        try:
            self._proc.wait(max(0.0, deadline - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self, reason: str) -> None:
        """Ask the plugin to stop; kill its whole group if it does not within the grace time."""
        self._stop_requested = reason
        if not self.running():
            return
        self._write(protocol.CANCEL)
        if not self.wait(self.kill_grace):
            self.kill()

    def kill(self) -> None:
        self._launcher.kill()

    def outcome(self) -> SandboxOutcome:
        self._pump(5)
        final = self._final
        if self._run_ended is None:
            self._launcher.release()  # it has exited (an executor that lives on keeps its network)
        else:
            self._cpu = max(self._cpu, float(self._run_ended.get("cpu") or 0.0))
            self._rss = max(self._rss, int(self._run_ended.get("max_rss_kb") or 0) * 1024)
        share_read_only(self.spec.host_folder)
        if self._violation:
            return self._ended("failed", error=f"sandboxed plugin {self._violation}", retryable=False)
        if self._stop_requested == "timeout":
            return self._ended("timeout", error=f"timed out after {self.spec.timeout:g} s")
        if self._stop_requested == "cancelled":
            return self._ended("cancelled", error="cancelled")
        if final and final["type"] == "result":
            return self._ended("succeeded", output=final.get("output"))
        if final and final["type"] == "error":
            if final.get("kind") == "cancelled":
                return self._ended("timeout" if final.get("timed_out") else "cancelled", error=final["error"])
            return self._ended("failed", error=final["error"], retryable=final.get("kind") != "setup")
        outcome, error, retryable = self._death()
        return self._ended(outcome, error=error, retryable=retryable)

    def _ended(self, outcome: str, *, output: Any = None, error: str = "", retryable: bool = True) -> SandboxOutcome:
        return SandboxOutcome(
            outcome,
            output=output,
            error=error,
            retryable=retryable,
            isolation=self.isolation,
            cpu_seconds=round(self._cpu, 3),
            max_rss_mb=round(self._rss / 2**20, 1),
        )

    def _death(self) -> tuple[str, str, bool]:
        """Why the launcher ended without a result: a limit it hit fails the attempt (not retried:
        it would hit it again); a kill no limit explains (the OOM killer, an operator) loses it."""
        code = self._proc.returncode
        tail = "".join(self._stderr)[-STDERR_KEEP:].strip()
        suffix = f": {tail}" if tail else ""
        # bwrap reports a child killed by a signal as exit code 128 + signal.
        signum = -code if code is not None and code < 0 else None
        if signum is None and self._launcher.bwrap and code is not None and code > 128:
            signum = code - 128
        if self._run_ended is not None:  # an executor's subtask process: its own status
            code, signum = self._run_ended.get("exit"), self._run_ended.get("signal")
        if signum is None:
            return "failed", f"sandboxed plugin exited with code {code} without a result{suffix}", True
        limits = self.spec.image.limits
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        if name == "SIGXCPU" or (name == "SIGKILL" and self._cpu >= limits.cpu_seconds):
            return "failed", f"sandboxed plugin exceeded its CPU time limit ({limits.cpu_seconds} s){suffix}", False
        if name == "SIGXFSZ":
            return (
                "failed",
                f"sandboxed plugin wrote a file over its size limit ({limits.max_file_mb} MB){suffix}",
                False,
            )
        if name == "SIGKILL":
            return "lost", f"sandboxed plugin was killed from outside (not by one of its limits){suffix}", True
        return "failed", f"sandboxed plugin died of {name}{suffix}", True
