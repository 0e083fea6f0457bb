"""One sandbox executor serving `sleep 0` subtasks: a process forked per subtask vs `isolation: shared`.

The built-in `sleep` plugin twice, in one script: as shipped (`isolation: shared`, the
subtasks run in the executor's own process) and a copy, `sleep_forked`, whose manifest says
`executor` (a process forked per subtask). Each runs `--subtasks` subtasks one at a time through one
executor of a worker's `Executors` (bwrap when installed, else Landlock, where `shared` runs
as `executor`), as the runner does: open a slot, run, close the slot, give it back. Prints per
mode the wall time from `run` to outcome (p50), and the CPU per subtask of this process and of
the executor's process tree (its own time and that of the subtask processes it reaped), then
the ratios shared / executor.

    python loadtests/bench_executor.py --subtasks 300

`--start-cost N` measures instead what starting an executor costs: N `sleep 0` subtasks with a
fresh executor each (`EDGEFLEET_SANDBOX_EXECUTOR_SUBTASKS=1`) against 5N through one reused
executor, the CPU of this process and everything it starts read from a cpuacct cgroup (so the
killed executors' CPU counts too); their difference per subtask is one start.

    python loadtests/bench_executor.py --start-cost 40
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgefleet.plugin_catalog import PluginCatalog
from edgefleet.settings import Settings
from edgefleet.workers.sandbox import LaunchSpec, PluginImage, SandboxedRun, SandboxPolicy
from edgefleet.workers.sandbox_executors import Executor, Executors, link_slot
from loadtests.harness import NodeCpu, sleep_plugin_copy, tree_cpu


def run_one(settings: Settings, executors: Executors, image: PluginImage, n: int) -> tuple[float, Executor]:
    executor, _ = executors.take(image, "bench")
    job_dir = settings.effective_workspace_dir / f"job{n}"
    slot = executor.open_slot(link_slot(settings.effective_workspace_dir, job_dir, "s"), [])
    run = SandboxedRun(
        LaunchSpec(
            image=executor.launcher.image,
            action="sleep",
            args={"seconds": 0},
            job_id=job_dir.name,
            subtask_id="s",
            attempt=1,
            workspace=slot.workspace,
            job_dir=job_dir,
            timeout=30,
            folder=slot.folder,
        ),
        executor.launcher,
        on_progress=lambda *_: None,
        on_checkpoint=lambda _: None,
        kill_grace=1,
    )
    started = time.perf_counter()
    run.start()
    if not run.wait(30):
        raise SystemExit("a subtask did not end")
    outcome = run.outcome()
    elapsed = time.perf_counter() - started
    if outcome.outcome != "succeeded":
        raise SystemExit(f"a subtask failed: {outcome}")
    executor.close_slot(slot)
    executors.give_back(executor, reusable=True)
    shutil.rmtree(job_dir, ignore_errors=True)
    shutil.rmtree(slot.workspace, ignore_errors=True)
    return elapsed, executor


def bench(root: Path, plugin_dir: Path | None, plugin_name: str, subtasks: int) -> dict[str, float | str]:
    settings = Settings(
        workspace_dir=root / "workspaces",
        plugin_dirs=[plugin_dir] if plugin_dir else [],
        # One executor for the whole run: its CPU stays countable (a recycled one's is lost).
        sandbox_executor_subtasks=subtasks + 100,
    )
    policy = SandboxPolicy.from_settings(settings)
    executors = Executors(settings, policy, settings.effective_workspace_dir)
    plugin = PluginCatalog.load(settings.plugin_folders).get(plugin_name)
    assert plugin is not None
    image = policy.image_of(plugin)
    try:
        for n in range(20):  # warm: the executor started, the plugin imported
            run_one(settings, executors, image, n)
        _, executor = run_one(settings, executors, image, 20)
        before_tree, before_self = tree_cpu(executor.launcher.proc.pid), time.process_time()
        times = []
        for n in range(subtasks):
            elapsed, used = run_one(settings, executors, image, 100 + n)
            if used is not executor:
                raise SystemExit("the executor was replaced during the run")
            times.append(elapsed)
        tree = (tree_cpu(executor.launcher.proc.pid) - before_tree) / subtasks * 1000
        own = (time.process_time() - before_self) / subtasks * 1000
        return {
            "p50": statistics.median(times) * 1000,
            "tree": tree,
            "own": own,
            "isolation": executor.launcher.isolation,
        }
    finally:
        executors.close()


def cpu_per_subtask(root: Path, subtasks: int, per_executor: int, meter: NodeCpu) -> float:
    """Milliseconds of CPU (the cgroup's: this process and all it started) per `sleep 0` subtask
    of the built-in plugin when each executor serves `per_executor` subtasks."""
    settings = Settings(workspace_dir=root / "workspaces", sandbox_executor_subtasks=per_executor)
    policy = SandboxPolicy.from_settings(settings)
    plugin = PluginCatalog.load(settings.plugin_folders).get("sleep")
    assert plugin is not None
    image = policy.image_of(plugin)
    executors = Executors(settings, policy, settings.effective_workspace_dir)
    try:
        for n in range(5):  # warm: imports, the first executor
            run_one(settings, executors, image, n)
    finally:
        executors.close()
    executors = Executors(settings, policy, settings.effective_workspace_dir)
    before = meter.seconds()
    try:
        for n in range(subtasks):
            run_one(settings, executors, image, 100 + n)
    finally:
        executors.close()  # the last executor's end counted too
    return (meter.seconds() - before) / subtasks * 1000


def start_cost(subtasks: int) -> None:
    meter = NodeCpu("executor-start")
    if meter.folder is None:
        raise SystemExit("--start-cost needs a cpuacct cgroup (root, cgroup v1 or v2)")
    root = Path(tempfile.mkdtemp(prefix="edgefleet-bench-executor-"))
    root.chmod(0o755)
    (meter.folder / "cgroup.procs").write_text(str(os.getpid()))
    try:
        fresh = cpu_per_subtask(root / "fresh", subtasks, 1, meter)
        reused = cpu_per_subtask(root / "reused", 5 * subtasks, 100_000, meter)
    finally:
        (meter.folder.parent / "cgroup.procs").write_text(str(os.getpid()))
        meter.close()
        shutil.rmtree(root, ignore_errors=True)
    print(f"CPU per sleep-0 subtask   fresh executor each {fresh:.2f} ms; one reused executor {reused:.2f} ms")
    print(f"an executor's start        {fresh - reused:.1f} ms of CPU")
    for per in (100, 1000):
        print(f"  amortised over {per:>4} subtasks: {(fresh - reused) / per:.3f} ms per subtask")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subtasks", type=int, default=300)
    parser.add_argument("--start-cost", type=int, default=0, metavar="N", help="measure an executor's start instead")
    args = parser.parse_args()
    if args.start_cost:
        start_cost(args.start_cost)
        return
    root = Path(tempfile.mkdtemp(prefix="edgefleet-bench-executor-"))
    root.chmod(0o755)  # the sandbox uid walks to its workspace
    try:
        plugins = sleep_plugin_copy(root / "plugins", name="sleep_forked", isolation="executor")
        forked = bench(root / "forked", plugins, "sleep_forked", args.subtasks)
        shared = bench(root / "shared", None, "sleep", args.subtasks)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"subtasks per mode        {args.subtasks} (sleep 0, one executor, one at a time; pid {os.getpid()})")
    for name, row in (("executor (fork)", forked), ("shared", shared)):
        print(
            f"{name:<24} run->outcome p50 {row['p50']:.2f} ms; CPU per subtask: executor tree "
            f"{row['tree']:.2f} ms, worker {row['own']:.2f} ms  [{row['isolation']}]"
        )
    print(
        f"ratio shared/executor    run->outcome {float(shared['p50']) / float(forked['p50']):.2f}; "
        f"CPU (tree + worker) {(float(shared['tree']) + float(shared['own'])) / (float(forked['tree']) + float(forked['own'])):.2f}"
    )


if __name__ == "__main__":
    main()
