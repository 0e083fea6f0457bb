"""Warm sandbox launchers: started ahead, each runs one subtask under the same limits as a cold start."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from edgefleet.plugin_catalog import PluginCatalog
from edgefleet.plugin_manifest import Permission
from edgefleet.workers.runner import linked_folders
from edgefleet.workers.sandbox import LauncherProcess, LaunchSpec, PluginImage, SandboxedRun, SandboxOutcome, bwrap_path
from edgefleet.workers.sandbox_pool import WarmLaunchers
from tests.conftest import wait_until

PLUGINS = Path(__file__).parent / "sandbox_plugins"
MODES = ["bwrap", "process"]


def image_of(name: str, folder: Path = PLUGINS) -> PluginImage:
    plugin = PluginCatalog.load([folder]).get(name)
    assert plugin is not None, name
    return PluginImage.of(plugin)


@pytest.fixture(params=MODES)
def pool(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WarmLaunchers]:
    if request.param == "bwrap" and bwrap_path() is None:
        pytest.skip("bubblewrap is not installed")
    launchers = WarmLaunchers(2, tmp_path / "workspaces", bwrap_path() if request.param == "bwrap" else None)
    yield launchers
    launchers.close()


def run_in(
    launcher: LauncherProcess, workspace: Path, action: str, args: dict[str, Any] | None = None
) -> SandboxOutcome:
    workspace.mkdir(parents=True, exist_ok=True)
    run = SandboxedRun(
        LaunchSpec(
            image=launcher.image,
            action=action,
            args=args or {},
            job_id="job",
            subtask_id="step",
            attempt=1,
            workspace=workspace,
            job_dir=workspace.parent,
            timeout=30,
        ),
        launcher,
        on_progress=lambda *_: None,
        on_checkpoint=lambda _: None,
        kill_grace=1,
    )
    run.start()
    assert run.wait(30), "the launcher did not finish its subtask"
    return run.outcome()


def warm(pool: WarmLaunchers, image: PluginImage) -> LauncherProcess:
    pool.replenish(image)
    launcher = pool.take(image)
    assert launcher is not None
    return launcher


def workspace_for(pool: WarmLaunchers, launcher: LauncherProcess) -> Path:
    """Where the runner would point the subtask: the launcher's own folder under bwrap."""
    return launcher.home if pool.bwrap else pool.workspace_root / "job" / "step"


def test_a_warm_launcher_runs_one_subtask_in_its_workspace_then_exits(pool: WarmLaunchers) -> None:
    image = image_of("files")
    launcher = warm(pool, image)
    assert pool.take(image) is None  # one was started, one was taken
    workspace = workspace_for(pool, launcher)
    outcome = run_in(launcher, workspace, "where")
    assert outcome.outcome == "succeeded", outcome
    where = outcome.output
    assert where["pid"] != os.getpid()
    assert Path(where["workspace"]) == workspace
    assert Path(where["cwd"]).resolve() == workspace.resolve()
    assert Path(where["home"]) == workspace
    assert Path(where["tmp"]) == workspace / ".tmp"
    assert not launcher.alive()
    assert outcome.isolation == ("bwrap+seccomp+rlimits" if pool.bwrap else "seccomp+rlimits")


def test_a_warm_launcher_keeps_the_manifests_limits(pool: WarmLaunchers) -> None:
    image = image_of("escape")
    server = socket.create_server(("127.0.0.1", 0))
    try:
        launcher = warm(pool, image)
        outcome = run_in(launcher, workspace_for(pool, launcher), "open_socket", {"port": server.getsockname()[1]})
    finally:
        server.close()
    assert outcome.outcome == "failed"
    assert "PermissionError" in outcome.error or "Operation not permitted" in outcome.error, outcome.error
    launcher = warm(pool, image)
    outcome = run_in(launcher, workspace_for(pool, launcher), "spawn")
    assert outcome.outcome == "failed" and "PermissionError" in outcome.error, outcome.error


def test_beyond_capacity_the_least_recently_used_launcher_is_killed(pool: WarmLaunchers) -> None:
    pool.replenish(image_of("escape"))
    pool.replenish(image_of("files"))
    [escape] = pool._idle[image_of("escape").key]
    pool.replenish(image_of("escape"))  # already waiting: escape becomes the most recent, nothing starts
    assert pool.idle_count() == 2
    pool.replenish(image_of("netok"))  # three images for two places: files goes
    assert pool.idle_count() == 2
    assert pool.take(image_of("files")) is None
    assert pool.take(image_of("escape")) is escape
    escape.discard()
    netok = pool.take(image_of("netok"))
    assert netok is not None
    netok.discard()
    if pool.bwrap:
        # An evicted launcher's folder, never handed a subtask, is removed with it.
        assert len(list(pool.slot_root.iterdir())) == 2


def test_a_launcher_that_died_while_waiting_is_not_handed_out(pool: WarmLaunchers) -> None:
    image = image_of("files")
    pool.replenish(image)
    [launcher] = [group[0] for group in pool._idle.values()]
    os.killpg(launcher.proc.pid, signal.SIGKILL)
    wait_until(lambda: not launcher.alive(), 5)
    assert pool.take(image) is None
    assert pool.idle_count() == 0


def test_closing_the_pool_leaves_no_launcher_running(pool: WarmLaunchers) -> None:
    pool.replenish(image_of("files"))
    pool.replenish(image_of("escape"))
    pids = [group[0].proc.pid for group in pool._idle.values()]
    pool.close()
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_plugin_that_fails_to_import_fails_its_subtask_as_a_setup_error(pool: WarmLaunchers, tmp_path: Path) -> None:
    folder = tmp_path / "plugins"
    shutil.copytree(PLUGINS / "files", folder / "files")
    (folder / "files" / "files_plugin.py").write_text("raise RuntimeError('broken at import')\n")
    image = image_of("files", folder)
    launcher = warm(pool, image)
    time.sleep(0.2)  # the import fails while it waits; the error must wait for a subtask
    assert launcher.alive()
    outcome = run_in(launcher, workspace_for(pool, launcher), "where")
    assert outcome.outcome == "failed" and not outcome.retryable
    assert "broken at import" in outcome.error


def test_under_bwrap_only_self_contained_attempts_take_a_warm_launcher(tmp_path: Path) -> None:
    pool = WarmLaunchers(1, tmp_path, "/usr/bin/bwrap")
    confined = image_of("files")
    reads_all = PluginImage(**{**confined.__dict__, "permissions": (Permission.file_system_read,)})
    fresh, used = tmp_path / "job" / "fresh", tmp_path / "job" / "used"
    used.mkdir(parents=True)
    assert pool.can_serve(confined, fresh, has_inputs=False)
    assert not pool.can_serve(confined, fresh, has_inputs=True)  # it could not see the earlier steps' files
    # file_system_read means the folders an operator granted, not the job's: no exception for it.
    assert not pool.can_serve(reads_all, fresh, has_inputs=True)
    assert not pool.can_serve(confined, used, has_inputs=False)  # an earlier attempt's files
    assert WarmLaunchers(1, tmp_path, None).can_serve(confined, used, has_inputs=True)
    assert not WarmLaunchers(0, tmp_path, None).can_serve(confined, fresh, has_inputs=False)


def test_linked_folders_are_the_targets_of_the_job_folders_links(tmp_path: Path) -> None:
    job = tmp_path / "job"
    (job / "cold").mkdir(parents=True)
    slots = [tmp_path / ".sandbox" / name for name in ("a", "b")]
    for index, slot in enumerate(slots):
        slot.mkdir(parents=True)
        (job / f"warm{index}").symlink_to(slot, target_is_directory=True)
    assert linked_folders(job, exclude=slots[1]) == [slots[0]]
