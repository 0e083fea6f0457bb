"""Reusable sandbox executors: one serves many subtasks of one plugin and tenant, and each subtask
still sees only its own workspace and inputs, nothing of the subtasks before it.

The first part drives workers.sandbox_executors directly (real sandboxes: bwrap, and
Landlock without it); the second runs jobs through a real router and worker, where the
runner decides which executor a subtask gets (tenant, recycling, `isolation: per_attempt`).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from edgefleet.plugin_catalog import PluginCatalog
from edgefleet.plugin_manifest import Isolation
from edgefleet.settings import Settings
from edgefleet.workers.landlock import abi_version
from edgefleet.workers.sandbox import (
    LaunchSpec,
    PluginImage,
    SandboxedRun,
    SandboxOutcome,
    SandboxPolicy,
    bwrap_path,
    process_tree_pids,
    tree_rss_bytes,
)
from edgefleet.workers.sandbox_executors import Executor, Executors, Slot, link_slot, rss_reading_due
from edgefleet.workers.sandbox_zygote import SPARE_NAME
from tests.conftest import ADMIN_TOKEN, Cluster, RedisServer, free_port, wait_until

PLUGINS = Path(__file__).parent / "sandbox_plugins"
MODES = ["bwrap", "landlock"]


def traversable(folder: Path) -> Path:
    """pytest makes its folders 0700; a sandbox uid must be able to walk to its workspace."""
    for path in [folder, *folder.parents]:
        if str(path).startswith("/tmp/") or path == folder:
            path.chmod(path.stat().st_mode | stat.S_IXOTH | stat.S_IROTH)
    return folder


class Box:
    """One worker process's executors and its sandbox policy, in one mode."""

    def __init__(self, mode: str, root: Path, **settings: Any) -> None:
        self.settings = Settings(
            workspace_dir=root / "workspaces",
            sandbox="auto" if mode == "bwrap" else "process",
            plugin_dirs=[PLUGINS],
            **settings,
        )
        self.policy = SandboxPolicy.from_settings(self.settings)
        self.executors = Executors(self.settings, self.policy, self.settings.effective_workspace_dir)
        self.catalog = PluginCatalog.load(self.settings.plugin_folders)  # the test plugins and the built-ins
        self.jobs = 0

    def image(self, name: str) -> PluginImage:
        plugin = self.catalog.get(name)
        assert plugin is not None, name
        return self.policy.image_of(plugin)

    def start(
        self,
        plugin: str,
        action: str,
        args: dict[str, Any] | None = None,
        *,
        tenant: str = "alice",
        inputs: list[Path] = (),  # type: ignore[assignment]
        timeout: float = 30,
        kill_grace: float = 1,
    ) -> tuple[SandboxedRun, Executor, Slot]:
        """One subtask started as the runner starts it in an executor."""
        executor, _ = self.executors.take(self.image(plugin), tenant)
        self.jobs += 1
        job_dir = self.settings.effective_workspace_dir / f"job{self.jobs}"
        slot = executor.open_slot(link_slot(self.settings.effective_workspace_dir, job_dir, "step"), list(inputs))
        run = SandboxedRun(
            LaunchSpec(
                image=executor.launcher.image,
                action=action,
                args=args or {},
                job_id=job_dir.name,
                subtask_id="step",
                attempt=1,
                workspace=slot.workspace,
                job_dir=job_dir,
                timeout=timeout,
                folder=slot.folder,
            ),
            executor.launcher,
            on_progress=lambda *_: None,
            on_checkpoint=lambda _: None,
            kill_grace=kill_grace,
        )
        run.start()
        return run, executor, slot

    def run(
        self,
        plugin: str,
        action: str,
        args: dict[str, Any] | None = None,
        *,
        tenant: str = "alice",
        inputs: list[Path] = (),  # type: ignore[assignment]
    ) -> tuple[SandboxOutcome, Executor, Slot]:
        """One subtask as the runner runs it in an executor; the executor is given back as it would be."""
        run, executor, slot = self.start(plugin, action, args, tenant=tenant, inputs=inputs)
        assert run.wait(30), "the subtask did not end"
        outcome = run.outcome()
        if outcome.outcome != "succeeded":
            executor.launcher.kill()
        executor.close_slot(slot)
        self.executors.give_back(executor, reusable=outcome.outcome == "succeeded")
        return outcome, executor, slot


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    if request.param == "bwrap" and bwrap_path() is None:
        pytest.skip("bubblewrap is not installed")
    if request.param == "landlock" and abi_version() < 1:
        pytest.skip("no Landlock on this kernel")
    return str(request.param)


@pytest.fixture()
def box(mode: str, tmp_path: Path) -> Iterator[Box]:
    made = Box(mode, traversable(tmp_path))
    yield made
    made.executors.close()


@pytest.fixture()
def bwrap_box(tmp_path: Path) -> Iterator[Box]:
    """Shared executors run in their own process only under bwrap."""
    if bwrap_path() is None:
        pytest.skip("bubblewrap is not installed")
    made = Box("bwrap", traversable(tmp_path))
    yield made
    made.executors.close()


def succeeded(outcome: SandboxOutcome) -> Any:
    assert outcome.outcome == "succeeded", outcome
    return outcome.output


def test_one_executor_serves_consecutive_subtasks_of_a_plugin_and_tenant(box: Box) -> None:
    first, executor, slot = box.run("marker", "mark", {"text": "one"})
    second, again, _ = box.run("marker", "mark", {"text": "two"})
    assert again is executor and again.pid == executor.pid and again.alive()
    assert succeeded(second)["imported"] == succeeded(first)["imported"]  # the plugin was imported once
    assert executor.served == 2
    # Each subtask got a fresh folder, which it now owns outside the executor's view.
    assert succeeded(first)["workspace"] != succeeded(second)["workspace"]
    assert Path(succeeded(first)["workspace"]) == slot.workspace
    assert slot.workspace.is_dir() and not slot.workspace.is_symlink()
    assert (slot.workspace / "mark.txt").read_text() == "one"
    assert slot.job_link.resolve() == slot.workspace
    # The path it worked in, resolved, is where its files stay: what it records about them holds.
    assert Path(succeeded(first)["cwd"]) == slot.workspace


def test_nothing_of_one_subtask_reaches_the_next(box: Box) -> None:
    """Workspace, /tmp, TMPDIR and module globals: the next subtask of the same executor sees none."""
    marked, executor, _ = box.run("marker", "mark", {"text": "secret1"})
    mark = succeeded(marked)
    assert mark["tmpdir_written"]
    looked, again, _ = box.run("marker", "look", {"text": "secret1", "previous": mark["workspace"]})
    assert again is executor
    seen = succeeded(looked)
    assert seen["imported"] == mark["imported"]
    assert seen["globals"] == []  # appended by the first subtask, in its own process
    assert seen["tmp"] == [] and seen["tmpdir"] == []
    assert seen["previous"] is False  # the first workspace, by its path: not visible
    assert seen["workspace"] == [".tmp"]
    assert len(seen["beside"]) <= 1  # under bwrap it may list its own folder in the executor root, no other


def spares(executor: Executor) -> list[int]:
    """The processes below an executor that wait, forked, for its next subtask."""
    found = []
    for pid in process_tree_pids(executor.launcher.proc.pid):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == SPARE_NAME:
                found.append(pid)
        except OSError:
            continue
    return found


def test_the_next_subtasks_process_is_forked_ahead_and_counted_once(box: Box) -> None:
    """Between subtasks an executor holds one spare, forked after the sweep; its pages are the
    executor's own, so the memory check does not count them twice; it ends with the executor."""
    first, executor, _ = box.run("marker", "mark", {"text": "one"})
    wait_until(lambda: len(spares(executor)) == 1, 30, what="a spare forked after the subtask")
    spare = spares(executor)[0]
    whole = tree_rss_bytes(executor.launcher.proc.pid)
    assert 0 < executor.rss_bytes() < whole
    second, again, _ = box.run("marker", "mark", {"text": "two"})
    assert again is executor and succeeded(second)["imported"] == succeeded(first)["imported"]
    assert not psutil.pid_exists(spare) or spare not in spares(executor)  # it became the second subtask
    wait_until(lambda: len(spares(executor)) == 1, 30, what="the next spare")
    spare = spares(executor)[0]
    box.executors.close()
    wait_until(lambda: not psutil.pid_exists(spare), 30, what="the spare gone with its executor")


def test_inputs_appear_read_only_at_their_paths(box: Box) -> None:
    written, _, slot = box.run("files", "write", {"text": "from step one"})
    path = succeeded(written)["path"]
    assert Path(path).parent == slot.workspace
    if box.policy.bwrap is None:
        # Landlock fixes a process's file view when it starts: the runner gives a subtask with
        # inputs a one-shot launcher started for it instead.
        assert not box.executors.serves(Isolation.executor, box.image("files"), Path("/nonexistent"), True)
        return
    # What the runner mirrors for a later step: the job's folder and the folders its links point to.
    inputs = [slot.job_link.parent, slot.workspace]
    read, executor, _ = box.run("files", "read", {"path": path}, inputs=inputs)
    assert succeeded(read) == {"text": "from step one"}
    through_link, _, _ = box.run("files", "read", {"path": str(slot.job_link / "note.txt")}, inputs=inputs)
    assert succeeded(through_link) == {"text": "from step one"}
    tampered, _, _ = box.run("escape", "write_outside", {"path": path}, inputs=inputs)
    assert tampered.outcome == "failed", tampered
    assert Path(path).read_text() == "from step one"
    assert slot.workspace.stat().st_mode & 0o200  # showing it changed nothing of the original
    # The mirror and the slots folder hold nothing once the subtask is over.
    assert executor.mirror is not None and executor.slots_folder is not None
    assert [p.name for p in executor.mirror.rglob("*")] == [".sandbox"]
    assert list(executor.slots_folder.iterdir()) == []


def test_what_a_subtask_started_does_not_outlive_it(box: Box) -> None:
    daemon, executor, _ = box.run("spawner", "daemon")
    pid = succeeded(daemon)["pid"]
    alive, again, _ = box.run("spawner", "alive", {"pid": pid})
    assert again is executor
    assert succeeded(alive) == {"alive": False}
    # The next subtask's process, forked ahead, waits there, and nothing else: Landlock: the
    # executor alone; bwrap: the executor, its pid namespace's init, below bwrap.
    wait_until(lambda: len(spares(executor)) == 1, 30, what="the next subtask's process forked")
    below = [p for p in psutil.Process(executor.pid).children(recursive=True) if p.status() != "zombie"]
    assert len([p for p in below if p.pid not in spares(executor)]) == (1 if box.policy.bwrap else 0), below


def test_a_cancel_reaches_the_plugin_and_the_executor_lives_on(box: Box) -> None:
    """The subtask's process reads the worker's cancel when the plugin asks (ctx.sleep does):
    it stops by itself, well inside the kill grace, so its executor is not killed."""
    # kill_grace: longer than the test's timeout, so only the plugin's own stop passes.
    run, executor, slot = box.start("sleep", "sleep", {"seconds": 600}, timeout=900, kill_grace=120)
    assert not run.wait(0.5)
    run.stop("cancelled")
    assert run.outcome().outcome == "cancelled"
    assert executor.alive(), "the plugin did not stop by itself: its executor was killed"
    executor.close_slot(slot)
    box.executors.give_back(executor, reusable=True)


def test_a_shared_plugin_runs_its_subtasks_in_the_executors_own_process(box: Box) -> None:
    """`isolation: shared`: module globals persist (the plugin's choice); workspace and /tmp do not."""
    first, executor, _ = box.run("sharer", "mark", {"text": "s1"})
    mark = succeeded(first)
    looked, again, _ = box.run("sharer", "look", {"text": "s1", "previous": mark["workspace"]})
    assert again is executor
    seen = succeeded(looked)
    assert seen["tmp"] == [] and seen["tmpdir"] == [] and seen["previous"] is False
    assert seen["workspace"] == [".tmp"]
    if box.policy.bwrap:
        assert seen["pid"] == mark["pid"] and seen["marks"] == ["s1"]
        assert looked.isolation.endswith("+shared-process")
    else:  # Landlock cannot narrow a running process to each workspace: forked as for `executor`
        assert seen["pid"] != mark["pid"] and seen["marks"] == []
        assert "shared-process" not in looked.isolation


def test_a_thread_left_behind_ends_a_shared_executor(bwrap_box: Box) -> None:
    """A plugin's background thread could write into the next subtask's workspace: its executor
    reports the subtask and exits, and the next subtask gets a new one."""
    done, executor, _ = bwrap_box.run("sharer", "thread")
    succeeded(done)
    wait_until(lambda: not executor.alive(), 30, what="the executor with a stray thread gone")
    after, other, _ = bwrap_box.run("sharer", "mark", {"text": "x"})
    assert other is not executor and succeeded(after)["marks"] == ["x"]


def test_a_shared_executor_stops_once_it_used_its_cpu_headroom(bwrap_box: Box) -> None:
    """Its subtasks share one process's CPU rlimit: after 2 s in all it makes way for a new one,
    so the next subtask still gets its whole `cpu_seconds`."""
    burnt, executor, _ = bwrap_box.run("sharer", "burn", {"seconds": 2.2})
    succeeded(burnt)
    wait_until(lambda: not executor.alive(), 30, what="the executor past its CPU headroom gone")
    after, other, _ = bwrap_box.run("sharer", "mark", {"text": "y"})
    assert other is not executor and succeeded(after)["marks"] == ["y"]


def test_a_shared_subtask_that_exits_fails_alone(box: Box) -> None:
    exited, executor, _ = box.run("sharer", "exit")
    assert exited.outcome == "failed", exited
    assert not executor.alive()
    after, other, _ = box.run("sharer", "mark", {"text": "z"})
    assert other is not executor and succeeded(after)["marks"] == ["z"]


def test_a_failure_recycles_the_executor(box: Box) -> None:
    _, first, _ = box.run("marker", "mark", {"text": "a"})
    failed, same, _ = box.run("marker", "fail")
    assert same is first and failed.outcome == "failed" and "asked to fail" in failed.error
    assert not first.alive()
    _, fresh, _ = box.run("marker", "mark", {"text": "b"})
    assert fresh.pid != first.pid
    assert not first.home.exists()


def test_tenants_never_share_an_executor(box: Box) -> None:
    alice, for_alice, _ = box.run("marker", "mark", {"text": "a"}, tenant="alice")
    bob, for_bob, _ = box.run("marker", "mark", {"text": "b"}, tenant="bob")
    assert for_bob is not for_alice and for_alice.alive()
    assert succeeded(alice)["imported"] != succeeded(bob)["imported"]
    _, alice_again, _ = box.run("marker", "mark", {"text": "c"}, tenant="alice")
    assert alice_again is for_alice


def test_recycled_after_n_subtasks_when_idle_and_over_its_memory(mode: str, tmp_path: Path) -> None:
    box = Box(mode, traversable(tmp_path), sandbox_executor_subtasks=2, sandbox_executor_idle_s=1.0)
    try:
        _, first, _ = box.run("marker", "mark", {"text": "a"})
        _, second, _ = box.run("marker", "mark", {"text": "b"})
        _, third, _ = box.run("marker", "mark", {"text": "c"})
        assert second is first and third is not first and not first.alive()
        wait_until(lambda: not box.executors.idle() and not third.alive(), 30, what="the idle executor stopped")
    finally:
        box.executors.close()
    (tmp_path / "small").mkdir()
    small = Box(mode, traversable(tmp_path / "small"), sandbox_executor_max_rss_mb=1)  # less than any Python holds
    try:
        _, first, _ = small.run("marker", "mark", {"text": "a"})
        _, second, _ = small.run("marker", "mark", {"text": "b"})
        assert second is not first and not first.alive()
    finally:
        small.executors.close()


def test_a_folder_left_by_a_worker_that_died_mid_subtask_reaches_the_next_attempt(box: Box) -> None:
    executor, _ = box.executors.take(box.image("marker"), "alice")
    root = box.settings.effective_workspace_dir
    link = link_slot(root, root / "jobx", "step")
    slot = executor.open_slot(link, [])
    (slot.folder / "partial.txt").write_text("half done")
    executor.launcher.kill()  # as if its worker process died: nothing moved the folder out
    box.executors.recover(link)
    assert (link / "partial.txt").read_text() == "half done"
    assert not box.executors.serves(Isolation.executor, box.image("marker"), link, False)  # a one-shot binds it


def test_folders_of_executors_whose_worker_died_are_removed(mode: str, tmp_path: Path) -> None:
    homes = tmp_path / "workspaces" / ".sandbox-x"
    stale, live = homes / "999999999-abc", homes / f"{os.getpid()}-abc"  # above any pid_max; ours
    slots = tmp_path / "workspaces" / ".sandbox"
    unused, used = slots / "a", slots / "b"
    for folder in (stale, live, unused, used):
        folder.mkdir(parents=True)
    (used / "out.txt").write_text("a subtask's")
    (stale / "preset").write_text("a\nb")
    (stale / "slots" / "c").mkdir(parents=True)  # a subtask it was running when its worker died
    (stale / "slots" / "c" / "part.txt").write_text("half")
    box = Box(mode, traversable(tmp_path))
    box.executors.close()
    assert not stale.exists() and not unused.exists()
    assert live.is_dir() and (used / "out.txt").exists()
    assert (slots / "c" / "part.txt").read_text() == "half"


# --- through the router and a worker: the runner's choices ---


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = traversable(tmp_path_factory.mktemp("reuse"))
    server = RedisServer(port=free_port(), data_dir=workdir / "redis")
    server.start()
    made = Cluster(
        redis=server,
        workdir=workdir,
        env_overrides={"EDGEFLEET_PLUGIN_DIRS": json.dumps([str(PLUGINS)]), "EDGEFLEET_SANDBOX_KILL_GRACE": "1"},
    )
    try:
        made.start_router()
        # One worker process: every subtask of a plugin and tenant may find the same executor.
        made.start_node(
            "reuse",
            classes="cpu",
            EDGEFLEET_CPU_CONCURRENCY="1",
            EDGEFLEET_EXPRESS_SLOTS="0",
            EDGEFLEET_SANDBOX_EXECUTOR_SUBTASKS="3",
        )
        made.wait_nodes_ready("reuse")
        yield made
    finally:
        made.stop()
        server.stop()


def step(
    cluster: Cluster, plugin: str, action: str, args: dict[str, Any], token: str = "alice-token", **more: Any
) -> dict:
    body = {"steps": [{"id": "x", "plugin": plugin, "action": action, "args": args, "node": "reuse", **more}]}
    job = cluster.submit(body, token=token)
    return cluster.wait_job(job["id"], timeout=90)["subtasks"][0]


def imported(subtask: dict) -> str:
    assert subtask["state"] == "succeeded", subtask
    return str(subtask["output"]["imported"])


def test_the_runner_reuses_within_a_tenant_and_recycles(cluster: Cluster) -> None:
    first = imported(step(cluster, "marker", "mark", {"text": "a1"}))
    assert imported(step(cluster, "marker", "mark", {"text": "a2"})) == first
    bob = imported(step(cluster, "marker", "mark", {"text": "b1"}, token="bob-token"))
    assert bob != first
    assert imported(step(cluster, "marker", "mark", {"text": "a3"})) == first  # its third: then recycled
    after_three = imported(step(cluster, "marker", "mark", {"text": "a4"}))
    assert after_three != first
    failed = step(cluster, "marker", "fail", {})
    assert failed["state"] == "failed" and "asked to fail" in failed["error"]
    after_failure = imported(step(cluster, "marker", "mark", {"text": "a5"}))
    assert after_failure not in (first, after_three)
    timed_out = step(cluster, "marker", "hang", {}, timeout=1.5)
    assert timed_out["state"] == "failed" and "timed out" in timed_out["error"]
    after_timeout = imported(step(cluster, "marker", "mark", {"text": "a6"}))
    assert after_timeout not in (first, after_three, after_failure)
    assert bob == imported(step(cluster, "marker", "mark", {"text": "b2"}, token="bob-token"))


def test_per_attempt_plugins_get_a_fresh_sandbox_each_time(cluster: Cluster) -> None:
    once = [imported(step(cluster, "marker_once", "mark", {"text": f"o{i}"})) for i in range(3)]
    assert len(set(once)) == 3
    reused = [imported(step(cluster, "marker", "mark", {"text": f"r{i}"}, token=ADMIN_TOKEN)) for i in range(2)]
    assert len(set(reused)) == 1


def test_a_step_reads_the_file_an_earlier_step_of_its_executor_wrote(cluster: Cluster) -> None:
    job = cluster.submit(
        {
            "steps": [
                {"id": "write", "plugin": "files", "action": "write", "args": {"text": "hello"}, "node": "reuse"},
                {
                    "id": "read",
                    "plugin": "files",
                    "action": "read",
                    "needs": ["write"],
                    "node": "reuse",
                    "args": {"path": {"$ref": "steps.write.output.path"}},
                },
            ]
        },
        token="alice-token",
    )
    status = cluster.wait_job(job["id"], timeout=60)
    assert status["state"] == "succeeded", status
    read = next(st for st in status["subtasks"] if st["id"] == "read")
    assert read["output"] == {"text": "hello"}
    workspaces = cluster.workdir / "data" / "workspaces"
    link = workspaces / job["id"] / "write"
    assert link.is_symlink() and link.resolve().parent == workspaces / ".sandbox"
    assert shutil.which("true")  # (the job folder layout is the warm launchers': workspace_gc removes both)
    assert os.path.isdir(link.resolve())


def test_an_executors_memory_is_read_after_its_first_subtask_every_fourth_and_near_the_limit() -> None:
    limit = 100 * 2**20
    small, near = 10 * 2**20, 60 * 2**20
    assert rss_reading_due(1, 0, limit)
    assert [n for n in range(2, 13) if rss_reading_due(n, small, limit)] == [4, 8, 12]
    assert all(rss_reading_due(n, near, limit) for n in range(2, 13))
