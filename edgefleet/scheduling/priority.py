"""Effective priority of a ready subtask: what the release scheduler's one formula means.

Ready subtasks wait in a Redis sorted set per resource class (`<prefix>:backlog:<class>`)
and the scheduler releases the LOWEST score first. The score is a *virtual time*:

    score = aging * (ready_at - EPOCH)                      (1) waiting time, "aging"
            - class_weight[priority class]                  (2) class head start
            + fairness * tenant_load                        (3) per-tenant fairness
    if the job has a deadline:                              (4) deadline pressure
        score = min(score, aging * (deadline_at - expected_run_s - EPOCH)
                           - max(class weights) - deadline_slack)

(the difference between the plain score and the capped one is the "deadline credit").

1. **Aging.** Everything is measured against the moment the subtask became ready, so
   waiting ages every item automatically and nothing ever needs rescoring just because
   time passes: an item that became ready Δ seconds earlier is `aging * Δ` ahead.
   `aging` (default 1) converts wall seconds into virtual seconds: raise it and waiting
   time counts for more against the class weights (old batch work gets through sooner).
2. **Class weights** are virtual seconds of head start: with `interactive=600,
   normal=60, batch=0` and `aging=1`, new interactive work goes ahead of batch work that
   has waited less than 600 s, and a batch item that waited longer than that gap beats
   new interactive work. Starvation is impossible: the gap is bounded.
3. **Fairness.** `tenant_load` is the number of the tenant's *other* subtasks that are
   ready, queued or running at the moment this one became ready (the Redis counter
   `<prefix>:tenant_active:<tenant>`). Each of them costs the new item `fairness`
   virtual seconds (default 1), so a tenant that floods 5,000 subtasks pushes its own
   tail thousands of seconds back, behind a light tenant's work, while its first items
   still compete normally (a virtual-finish-time approximation of fair queueing).
4. **Deadline pressure.** For jobs that set `deadline_s` (`deadline_at = created_at +
   deadline_s`), the score is capped at the latest start time `deadline_at -
   expected_run_s` minus the largest class weight: the item ranks at least like
   top-class work that became ready at its latest start time, minus `deadline_slack`
   extra virtual seconds. A deadline far in the future changes nothing; a near one
   jumps the backlog.

5. **Minimum batch share** (not part of the score). Static priorities starve batch
   under sustained interactive load; the class head start alone lets batch through
   only after it has waited longer than the head start. With `batch_min_share` = s,
   the release script counts the releases of each class (priority) over the last
   `share_window_s` (exponentially decayed) and, while batch work waits and batch got
   less than s of them, releases the lowest-scored batch item instead of the lowest
   score overall. Batch then keeps at least s of the slots and interactive work the
   rest, in score order; with s = 0 only the score decides.

The formula exists once: `effective_score` in `lua/score.lua`, which every job store
script that makes a subtask ready (and the release and rescoring scripts) runs inside
Redis. This module holds what the Lua is given: `EPOCH` and `DEFAULT_WEIGHTS` go into
the header of every script (`edgefleet.store.scripts`), and `validate_weights` guards
every change. The tests evaluate the Lua itself (tests/test_scheduler.py).

Weights live in the Redis hash `<prefix>:scheduler:weights` (fields = `WEIGHT_NAMES`)
so that they survive router restarts and every router and worker scores alike. A
router seeds missing fields from its settings (`scheduler_weights`, defaulting to
`DEFAULT_WEIGHTS`) at start; the values in Redis win from then on and change through
`SchedulerState.set_weights`, which rescores every waiting item at once (in the same script):
unlike Celery's send-time priorities, already-waiting work is reordered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# Subtracted from Redis TIME before scaling: keeps scores small, so that Lua's
# 14-significant-digit number formatting keeps sub-millisecond resolution.
EPOCH = 1_700_000_000.0

DEFAULT_WEIGHTS: dict[str, float] = {
    "interactive": 600.0,  # virtual seconds of head start per priority class
    "normal": 60.0,
    "batch": 0.0,
    "aging": 1.0,  # virtual seconds per second waited
    "fairness": 1.0,  # virtual seconds per subtask the tenant already has in flight
    "deadline_slack": 0.0,  # extra virtual seconds of head start at the latest start time
    "expected_run_s": 5.0,  # assumed run time of a subtask, for the latest start time
    "batch_min_share": 0.0,  # fraction of a class's releases batch gets while it waits; 0: off
    "share_window_s": 10.0,  # seconds over which those releases are counted (exponential decay)
}
WEIGHT_NAMES = tuple(DEFAULT_WEIGHTS)


def validate_weights(changes: Mapping[str, float]) -> dict[str, float]:
    """Known names with finite numbers; `aging` and `share_window_s` positive,
    `batch_min_share` a fraction, the others >= 0."""
    out: dict[str, float] = {}
    for name, value in changes.items():
        if name not in DEFAULT_WEIGHTS:
            raise ValueError(f"unknown scheduler weight {name!r} (known: {', '.join(WEIGHT_NAMES)})")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"weight {name!r} must be a finite number")
        if name == "aging" and number <= 0:
            raise ValueError("weight 'aging' must be positive")
        if name != "aging" and number < 0:
            raise ValueError(f"weight {name!r} must not be negative")
        if name == "batch_min_share" and number > 1:
            raise ValueError("weight 'batch_min_share' is a fraction of releases, at most 1")
        if name == "share_window_s" and number <= 0:
            raise ValueError("weight 'share_window_s' must be positive")
        out[name] = number
    return out
