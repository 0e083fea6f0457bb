"""Redis key names of the job store, defined once: Python formats them, Lua gets them generated.

`KEY_TEMPLATES` is the only place a key name is spelled. `Keys` formats them for the
Python side; `lua_key_functions` turns the same templates into the `K` table of Lua
functions that every store script starts with (the scripts get the prefix as ARGV[1]),
so Python and Lua cannot disagree on a name.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Final

from edgefleet.schemas import ResourceClass

# "|" never occurs in job ids (hex) or step ids (see STEP_ID_PATTERN).
MEMBER_SEP = "|"

# Name -> key after "<prefix>:", with {placeholders}. Kinds: h hash, z sorted set, l list, s set, x stream.
KEY_TEMPLATES: Final[dict[str, str]] = {
    # jobs
    "job": "job:{job_id}",  # h: one job
    "subtask": "st:{job_id}:{subtask_id}",  # h: one subtask
    "job_events": "ev:{job_id}",  # l: the job's events, one packed entry each (edgefleet/store/events.py)
    "event_feed": "evfeed",  # x: "j" = job id of every event, capped: wakes those who follow a job's events
    "events": "events:{job_id}",  # x: a job's events before issue 12 (read and deleted, no longer written)
    "jobs": "jobs",  # z: every job by creation time, before issue 12 (no longer written; gc drains it)
    "jobs_in_state": "jobs:s:{state}",  # z: jobs in one state, by creation time (listings merge the states)
    "tenant_jobs": "jobs:t:{tenant}",  # z: a tenant's jobs, before issue 12 (as "jobs")
    "tenant_jobs_in_state": "jobs:t:{tenant}:s:{state}",  # z
    "finished": "finished",  # z: job id -> finished_at, of every job that ended (what retention deletes)
    "idempotency": "idem:{tenant}:{key}",  # string: the job an Idempotency-Key made
    "callbacks": "callbacks",  # l: ended jobs with a callback_url, for the webhook intake
    "tenant_active": "tenant_active:{tenant}",  # string: the tenant's ready/queued/running subtasks
    # attempts
    "queued": "queued:{resource_class}",  # z: released, not yet claimed ("job|subtask" -> queued_at)
    # z: worker slots of the class that take their next subtask themselves ("node|pid" -> until when)
    "takers": "takers:{resource_class}",
    # z: the takers among them that found nothing and wait for work ("node|pid" -> until when)
    "lingering": "lingering:{resource_class}",
    "wake": "wake:{resource_class}",  # l: a token per subtask made ready while slots linger
    "dispatching": "dispatching",  # z: popped from a backlog, not yet sent ("job|subtask|attempt")
    "delayed": "delayed",  # z: retries waiting for their backoff
    "running": "running",  # z: "job|subtask" -> lease end
    # the release scheduler
    "backlog": "backlog:{resource_class}",  # z: ready subtasks by score
    "backlog_of_priority": "backlog:{resource_class}:{priority}",  # z: the same, one priority class
    "backlog_count": "backlog_count:{resource_class}",  # h: priority class -> members of the backlog
    "weights": "scheduler:weights",  # h
    "target_depth": "scheduler:target_depth",  # h: class -> depth
    "changes": "scheduler:changes",  # l: newest first, 20 kept
    "released": "scheduler:released:{resource_class}",  # h: decayed releases per priority class
    "leader": "scheduler:leader",  # string: the router holding the release lease
    "loop_released": "scheduler:loop_released",  # h: router id -> subtasks its release loop released
    "feedback": "scheduler:feedback",  # h: the feedback loop's last round
    # nodes
    "node": "node:{name}",  # string: a node's heartbeat (NodeInfo JSON), with a TTL
    "nodes": "nodes",  # s: node names (pruned of expired heartbeats on read)
    "warm_models": "warm:{node}",  # s: models loaded in some worker process of the node
    "bench_request": "nodes:bench_request",  # string: a counter; nodes benchmark again when it grows
    "router_endpoint": "router:endpoint",  # string: JSON {port, url}: where boxes reach the router
    # webhooks
    "webhooks_due": "webhooks:due",  # z: pending delivery id -> next attempt (or end of its claim)
    "webhook": "webhook:{delivery_id}",  # h: one delivery's record
    "webhook_secret": "webhook_secret:{tenant}",  # h: a tenant's signing secret (and the previous one)
    # artifacts (edgefleet/store/artifacts.py): files that move between boxes, by sha256
    "artifact": "artifact:{artifact_id}",  # h: one stored blob (size, kind, name, node, created_at)
    "artifact_holders": "artifact:{artifact_id}:holders",  # s: nodes with a local copy (original or cache)
    "job_artifacts": "artifacts:job:{job_id}",  # h: subtask id -> JSON list of the artifacts it produced
    "tenant_artifacts": "artifacts:tenant:{tenant}",  # z: artifact ids a tenant may use -> last use
    "artifact_secret": "artifacts:secret",  # string: what nodes' artifact credentials are derived from
    # node access: join tokens and the per-node Redis ACL users they admit (store/acl.py)
    "join_token": "join:{token_id}",  # h: one join token (secret and passwords only as sha256)
    "join_tokens": "joins",  # z: token id -> created_at
    # schedules (edgefleet/store/schedules.py): jobs made at fire times; times in ms since the epoch
    "schedule": "schedule:{schedule_id}",  # h: one schedule (spec JSON, state, next_at, last_job, counts)
    "schedule_runs": "schedule:{schedule_id}:runs",  # z: fire time -> fire time, the runs kept
    "schedule_run": "schedule:{schedule_id}:run",  # h: fire time -> the run's record (JSON)
    "schedules": "schedules",  # z: schedule id -> created_at
    "tenant_schedules": "schedules:t:{tenant}",  # z: a tenant's schedule ids -> created_at
    "schedules_due": "schedules:due",  # z: active schedule id -> when its next fire time is due (jitter in)
    "schedules_pending": "schedules:pending",  # z: "id|fire time" claimed, job not yet recorded -> claimed at
}

_LITERAL = re.compile(r"[a-z_:]*")


def member(job_id: str, subtask_id: str) -> str:
    return f"{job_id}{MEMBER_SEP}{subtask_id}"


def _parts(template: str) -> list[tuple[str, str | None]]:
    """(literal text, placeholder or None) pairs of a template."""
    return [(literal, name) for literal, name, _, _ in string.Formatter().parse(template)]


def lua_key_functions() -> str:
    """The Lua table `K`: one function per key name, over the prefix `P` (ARGV[1] of every script)."""
    lines = ["local K = {}"]
    for name, template in KEY_TEMPLATES.items():
        params: list[str] = []
        pieces = ["P"]
        for literal, placeholder in _parts(":" + template):
            if not _LITERAL.fullmatch(literal):
                raise ValueError(f"key template {name!r}: literal {literal!r} needs Lua quoting")
            if literal:
                pieces.append(f"'{literal}'")
            if placeholder:
                params.append(placeholder)
                pieces.append(placeholder)
        lines.append(f"function K.{name}({', '.join(params)}) return {' .. '.join(pieces)} end")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Keys:
    prefix: str = "ef"

    def key(self, kind: str, /, **parts: str) -> str:
        """The key `kind` of `KEY_TEMPLATES` with its placeholders filled in."""
        return f"{self.prefix}:{KEY_TEMPLATES[kind].format(**parts)}"

    def job(self, job_id: str) -> str:
        return self.key("job", job_id=job_id)

    def subtask(self, job_id: str, subtask_id: str) -> str:
        return self.key("subtask", job_id=job_id, subtask_id=subtask_id)

    def events(self, job_id: str) -> str:
        """The job's event stream of the old form (one stream per job): read, never written."""
        return self.key("events", job_id=job_id)

    def job_events(self, job_id: str) -> str:
        return self.key("job_events", job_id=job_id)

    @property
    def event_feed(self) -> str:
        return self.key("event_feed")

    def backlog(self, resource_class: ResourceClass | str) -> str:
        return self.key("backlog", resource_class=_value(resource_class))

    def backlog_of_priority(self, resource_class: ResourceClass | str, priority: str) -> str:
        return self.key("backlog_of_priority", resource_class=_value(resource_class), priority=priority)

    def backlog_count(self, resource_class: ResourceClass | str) -> str:
        """Hash: priority class -> number of that class's members in `backlog(resource_class)`."""
        return self.key("backlog_count", resource_class=_value(resource_class))

    def queued(self, resource_class: ResourceClass | str) -> str:
        return self.key("queued", resource_class=_value(resource_class))

    def wake(self, resource_class: ResourceClass | str) -> str:
        """List a lingering slot blocks on: a token each time its class's backlog gains a subtask."""
        return self.key("wake", resource_class=_value(resource_class))

    def takers(self, resource_class: ResourceClass | str) -> str:
        """Sorted set: "node|pid" of a chaining slot -> until when it takes its class's next subtask."""
        return self.key("takers", resource_class=_value(resource_class))

    def jobs_index(self, tenant: str | None = None, state: str | None = None) -> str:
        if tenant is None:
            return self.key("jobs") if state is None else self.key("jobs_in_state", state=state)
        if state is None:
            return self.key("tenant_jobs", tenant=tenant)
        return self.key("tenant_jobs_in_state", tenant=tenant, state=state)

    def tenant_active(self, tenant: str) -> str:
        return self.key("tenant_active", tenant=tenant)

    def node(self, name: str) -> str:
        return self.key("node", name=name)

    @property
    def nodes(self) -> str:
        return self.key("nodes")

    @property
    def running(self) -> str:
        return self.key("running")

    @property
    def finished(self) -> str:
        """Sorted set: job id -> finished_at, of every job that ended (what retention deletes)."""
        return self.key("finished")

    @property
    def callbacks(self) -> str:
        return self.key("callbacks")

    @property
    def webhooks_due(self) -> str:
        """Sorted set: pending webhook delivery id -> when it may next be attempted (or its claim ends)."""
        return self.key("webhooks_due")

    def webhook(self, delivery_id: str) -> str:
        """Hash: one webhook delivery's record (job, tenant, url, attempt, state, last status/error)."""
        return self.key("webhook", delivery_id=delivery_id)

    def webhook_secret(self, tenant: str) -> str:
        """Hash: a tenant's webhook signing secret, and the previous one while it is still honoured."""
        return self.key("webhook_secret", tenant=tenant)

    def warm_models(self, node: str) -> str:
        return self.key("warm_models", node=node)

    def idempotency(self, tenant: str, key: str) -> str:
        return self.key("idempotency", tenant=tenant, key=key)


def _value(resource_class: ResourceClass | str) -> str:
    return resource_class.value if isinstance(resource_class, ResourceClass) else resource_class
