"""The job store: everything edgefleet keeps in Redis, behind one connection.

- `jobs`: `JobStore`, the one object a process holds (jobs, idempotency, retention, the
  reads metrics and feedback need), with its parts as attributes:
- `attempts`: `store.attempts`, what workers do with a delivered subtask (claim, renew,
  checkpoint, complete, lost) and the reaper;
- `nodes`: `store.nodes`, worker heartbeats and warm models;
- `webhooks`: `store.webhooks`, webhook deliveries and signing secrets;
- `artifacts`: `store.artifacts`, the files steps produced (by sha256), their holders, tenants' ids;
- `schedules`: `ScheduleStore.of(store)`, schedules, their due fire times, claims and runs;
- `events`: `JobEventReader`, a job's event stream read with asyncio (server-sent events);
- `connection`, `scripts`: the shared client and the Lua scripts (`lua/*.lua`, loaded
  when a store is built; key names come from `edgefleet.keys`).

The release scheduler's state is a store class of its own on the same connection:
`edgefleet.scheduling.state.SchedulerState`.
"""

from edgefleet.store.attempts import Claim, Completion, Lost, Outcome, Renewal, Usage
from edgefleet.store.jobs import CreateResult, FinishedJob, GcBatch, JobStore, SubtaskTimes

__all__ = [
    "Claim",
    "Completion",
    "CreateResult",
    "FinishedJob",
    "GcBatch",
    "JobStore",
    "Lost",
    "Outcome",
    "Renewal",
    "SubtaskTimes",
    "Usage",
]
