"""The release scheduler: which ready subtask goes to Celery next, and where.

- `priority`: the weights, their defaults and validation, and what the score means
  (the formula itself runs in Redis: `lua/score.lua`, the only copy).
- `state`: `SchedulerState`, the scheduler's data in the job store: the per-class
  backlogs and the release script (`lua/release.lua`), weights, target depths,
  backlog counts, the leader lease.
- `dispatch`: `Dispatcher`, which releases a class's backlog into Celery queues.
- `affinity`: `ModelAffinity`, which sends a subtask that needs a model to a box
  that has it warm.

Nothing is imported here: the job store imports `priority` while this package's
other modules import the job store.
"""
