"""Redis key names of the job store, in one place so that Python and Lua agree."""

from __future__ import annotations

from dataclasses import dataclass

from edgefleet.schemas import ResourceClass

# "|" never occurs in job ids (hex) or step ids (see STEP_ID_PATTERN).
MEMBER_SEP = "|"


def member(job_id: str, subtask_id: str) -> str:
    return f"{job_id}{MEMBER_SEP}{subtask_id}"


@dataclass(frozen=True)
class Keys:
    prefix: str = "ef"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def subtask(self, job_id: str, subtask_id: str) -> str:
        return f"{self.prefix}:st:{job_id}:{subtask_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def backlog(self, resource_class: ResourceClass | str) -> str:
        return f"{self.prefix}:backlog:{_value(resource_class)}"

    def backlog_count(self, resource_class: ResourceClass | str) -> str:
        """Hash: priority class -> number of that class's members in `backlog(resource_class)`."""
        return f"{self.prefix}:backlog_count:{_value(resource_class)}"

    def queued(self, resource_class: ResourceClass | str) -> str:
        return f"{self.prefix}:queued:{_value(resource_class)}"

    def jobs_index(self, tenant: str | None = None, state: str | None = None) -> str:
        key = f"{self.prefix}:jobs"
        if tenant is not None:
            key += f":t:{tenant}"
        if state is not None:
            key += f":s:{state}"
        return key

    def node(self, name: str) -> str:
        return f"{self.prefix}:node:{name}"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}:nodes"

    @property
    def running(self) -> str:
        return f"{self.prefix}:running"

    @property
    def finished(self) -> str:
        """Sorted set: job id -> finished_at, of every job that ended (what retention deletes)."""
        return f"{self.prefix}:finished"

    @property
    def callbacks(self) -> str:
        return f"{self.prefix}:callbacks"

    @property
    def webhooks_due(self) -> str:
        """Sorted set: pending webhook delivery id -> when it may next be attempted (or its claim ends)."""
        return f"{self.prefix}:webhooks:due"

    def webhook(self, delivery_id: str) -> str:
        """Hash: one webhook delivery's record (job, tenant, url, attempt, state, last status/error)."""
        return f"{self.prefix}:webhook:{delivery_id}"

    def webhook_secret(self, tenant: str) -> str:
        """Hash: a tenant's webhook signing secret, and the previous one while it is still honoured."""
        return f"{self.prefix}:webhook_secret:{tenant}"

    def warm_models(self, node: str) -> str:
        return f"{self.prefix}:warm:{node}"

    def idempotency(self, tenant: str, key: str) -> str:
        return f"{self.prefix}:idem:{tenant}:{key}"


def _value(resource_class: ResourceClass | str) -> str:
    return resource_class.value if isinstance(resource_class, ResourceClass) else resource_class
