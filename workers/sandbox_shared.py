"""An executor that runs its subtasks in its own process: a manifest's `isolation: shared`.

For plugins that keep nothing between calls that matters (the manifest says so): the fork per
subtask, its copy-on-write faults and its exit are most of a short subtask's CPU. What the
subtask sees stays what a forked one sees, but for module globals, which the plugin agreed
to share with the next subtasks of its own version and tenant:
- its workspace only: the executor's view is its bwrap mirror, where the worker shows one
  subtask's folder at a time (so only under bwrap; under Landlock, whose layer covers all of
  an executor's slots and cannot be narrowed again, `serve` in sandbox_zygote forks instead);
- an empty `/tmp`, and no process of an earlier subtask (swept, as after a forked one);
- no thread of an earlier subtask: an executor that has more threads after a subtask than
  after the plugin's import (a subtask's background thread could write into the next
  workspace) reports `ended` and exits, so the worker starts a new one;
- the plugin's own seccomp filter on the whole executor, loaded before the first subtask;
- its CPU limit per subtask: the soft RLIMIT_CPU moves to "used so far + the manifest's
  `cpu_seconds`" before each one. The hard limit (`cpu_seconds` + 2, set by the launcher)
  cannot rise, so the executor exits once it has used 2 s: every subtask keeps its whole
  budget, and CPU-heavy plugins, which gain nothing here, get a fresh process soon.
"""

from __future__ import annotations

import json
import os
import resource
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgefleet.workers import sandbox_protocol as protocol

if TYPE_CHECKING:
    from edgefleet.workers.sandbox_launcher import _Channel, _Lines

# CPU seconds an executor may use in all before it stops taking subtasks (see the module's docstring).
CPU_HEADROOM_S = 2.0


def serve(stdin: _Lines, channel: _Channel, image: dict[str, Any], function: Callable[..., Any]) -> None:
    """Run `run` messages in this process, one at a time, until the worker closes the pipe or
    the process is no longer fit for another subtask."""
    from edgefleet.workers.sandbox_zygote import end_subtask, load_filter

    load_filter(image)
    budget = float(image["limits"]["cpu_seconds"])
    threads = _threads()  # the import's own (a library's pool) are module state, shared by choice
    while line := stdin.next():
        message = json.loads(line)
        if message.get("type") != "run":
            continue  # a cancel or model reply that arrived after its subtask ended
        used = _cpu_used()
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        soft = int(used + budget) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
        usage = _run_here(stdin, channel, image, function, message)
        clean = 0 < _threads() <= threads
        end_subtask(channel, 0, usage)
        if not clean or used + usage.ru_utime + usage.ru_stime >= CPU_HEADROOM_S:
            return  # the worker finds this executor gone and starts a new one for the next subtask


def _run_here(
    stdin: _Lines, channel: _Channel, image: dict[str, Any], function: Callable[..., Any], spec: dict[str, Any]
) -> types.SimpleNamespace:
    from edgefleet.workers.sandbox_launcher import SubtaskControl, run_with_control

    before = resource.getrusage(resource.RUSAGE_SELF)
    # The worker's stdin is read here while the subtask runs, and by `serve` between subtasks.
    control = SubtaskControl(channel, stdin)
    try:
        run_with_control(channel, image, function, spec, control)
    except BaseException as exc:  # a setup step failed (its workspace): the subtask's error
        channel.send(protocol.error("exception", f"{type(exc).__name__}: {exc}"))
    finally:
        control.close()  # a thread it left behind must not read the next subtask's messages
    after = resource.getrusage(resource.RUSAGE_SELF)
    return types.SimpleNamespace(
        ru_utime=after.ru_utime - before.ru_utime, ru_stime=after.ru_stime - before.ru_stime, ru_maxrss=after.ru_maxrss
    )


def _cpu_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0  # unknown: treated as not clean
