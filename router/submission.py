"""Submitting a job: validate → idempotency → plan → dry run → create → release.

Plain code with typed inputs and outcomes, no HTTP: a refusal is a `SubmissionError`
subclass carrying `(field, reason)` problems, which `router.errors` turns into the
answer's status and body. The jobs route only reads the body and shapes the outcome.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from edgefleet.models.errors import NoModelAvailable
from edgefleet.netguard import OutboundGuard
from edgefleet.router.artifact_inputs import artifact_problems
from edgefleet.router.goal_planner import GoalPlan, GoalPlanError
from edgefleet.router.model_access import LazyGoalPlanner
from edgefleet.router.planner import PlanError, Planner, Problem, pydantic_problems
from edgefleet.router.webhooks import callback_url_problem
from edgefleet.scheduling.dispatch import Dispatcher
from edgefleet.scheduling.state import Released
from edgefleet.schemas import (
    JobRequest,
    JobState,
    JobStatus,
    NodeInfo,
    Plan,
    PlanPreview,
    StepSpec,
    SubtaskState,
    SubtaskStatus,
)
from edgefleet.store import JobStore
from edgefleet.store.jobs import CreateResult, NewJob

IDEMPOTENCY_KEY_MAX = 200
# Seconds the live nodes read for the capability check serve later submissions (see `nodes_to_check`).
NODES_FRESH_S = 1.0
IDEMPOTENCY_REUSED = ("Idempotency-Key", "already used for a different request body")


class SubmissionError(Exception):
    """A submission refused; `problems` name the field and the reason."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(f"{f}: {r}" for f, r in problems))
        self.problems = problems


class InvalidSubmission(SubmissionError):
    """The body or a header breaks the input contract."""


class IdempotencyConflict(SubmissionError):
    """The Idempotency-Key was used before with another body."""

    def __init__(self) -> None:
        super().__init__([IDEMPOTENCY_REUSED])


class InvalidPlan(SubmissionError):
    """The steps (given, or from a template) cannot run as asked."""


class PlanRejected(SubmissionError):
    """The model planned the goal, but its plan is still invalid after the repair round."""

    def __init__(self, problems: list[Problem], model: str | None, answer: str) -> None:
        super().__init__(problems)
        self.model = model
        self.answer = answer


class NoModel(SubmissionError):
    """No model can plan a goal now (none configured, or all failing)."""


@dataclass(frozen=True)
class Accepted:
    """The job: `created` is False when an Idempotency-Key named an existing one."""

    status: JobStatus
    created: bool


@dataclass(frozen=True)
class DryRun:
    preview: PlanPreview


Outcome = Accepted | DryRun


@dataclass(frozen=True)
class BatchJob:
    """One job of a batch: its body and its own Idempotency-Key (the body's `idempotency_key`)."""

    request: JobRequest
    idempotency_key: str | None


@dataclass(frozen=True)
class Placed:
    """A batch job that has its job: made now (`created`), or an Idempotency-Key's earlier one."""

    job_id: str
    created: bool
    state: JobState


BatchOutcome = Placed | SubmissionError


@dataclass(frozen=True)
class _Ready:
    """A batch job planned and checked, waiting for the one create call."""

    index: int
    job: BatchJob
    digest: str
    planned: Planned


@dataclass(frozen=True)
class Planned:
    plan: Plan
    goal_plan: GoalPlan | None = None

    def preview(self) -> PlanPreview:
        goal = self.goal_plan
        return PlanPreview(
            steps=goal.steps if goal else steps_from_plan(self.plan),
            subtasks=self.plan.subtasks,
            model=goal.model if goal else None,
            fell_back_from=goal.fell_back_from if goal else [],
            repaired=goal.repaired if goal else False,
        )


def request_hash(request: JobRequest) -> str:
    return _hash_of(request.model_dump(mode="json"))


def _hash_of(dumped: dict[str, Any]) -> str:
    # The stdlib's canonical form (ASCII escapes) on purpose: keys stored before stay comparable.
    canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def steps_from_plan(plan: Plan) -> list[StepSpec]:
    return [
        StepSpec(
            id=st.id,
            plugin=st.plugin,
            action=st.action,
            args=st.args,
            needs=st.needs,
            resource_class=st.resource_class,
            node=st.node,
            timeout=st.timeout,
            retries=st.retries,
            retry_backoff=st.retry_backoff,
        )
        for st in plan.subtasks
    ]


def parse_submission(data: Any, idempotency_key: str | None) -> JobRequest:
    """The body (parsed JSON) as a JobRequest; the checks run in this order, so that a body
    with several problems always gets the same answer."""
    if not isinstance(data, dict):
        raise InvalidSubmission([("body", "must be a JSON object")])
    if idempotency_key is not None and not (0 < len(idempotency_key) <= IDEMPOTENCY_KEY_MAX):
        raise InvalidSubmission([("Idempotency-Key", f"1 to {IDEMPOTENCY_KEY_MAX} characters")])
    try:
        request = JobRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidSubmission(pydantic_problems(exc)) from None
    # Before a goal is planned (by a model that may be absent): one way to say what to run.
    given = [k for k in ("steps", "template", "goal") if getattr(request, k) is not None]
    if len(given) != 1:
        reason = "give exactly one of 'steps', 'template' or 'goal'"
        conflict = f"{reason}; this body has {' and '.join(repr(k) for k in given)}" if given else reason
        raise InvalidSubmission([(k, conflict) for k in given or ["steps"]])
    return request


BATCH_KEY_FIELD = "idempotency_key"


def prefixed(index: int, exc: SubmissionError) -> SubmissionError:
    """A job's problems named from the batch body: `steps.0.plugin` -> `jobs.3.steps.0.plugin`."""

    def field(name: str) -> str:
        if name in ("body", ""):
            return f"jobs.{index}"
        if name == "Idempotency-Key":
            return f"jobs.{index}.{BATCH_KEY_FIELD}"
        return f"jobs.{index}.{name}"

    exc.problems = [(field(f), reason) for f, reason in exc.problems]
    return exc


def parse_batch(data: Any, max_jobs: int) -> list[BatchJob | SubmissionError]:
    """The batch body `{"jobs": [...]}`: each job a JobRequest body plus an optional
    `idempotency_key`; one entry per job, its BatchJob or why it is refused (fields named
    `jobs.<index>...`). A body that is no batch at all raises InvalidSubmission."""
    if not isinstance(data, dict):
        raise InvalidSubmission([("body", 'must be a JSON object: {"jobs": [<job>, ...]}')])
    if extra := sorted(set(data) - {"jobs"}):
        raise InvalidSubmission([(name, "unknown field; a batch body has only 'jobs'") for name in extra[:20]])
    jobs = data.get("jobs")
    if not isinstance(jobs, list):
        raise InvalidSubmission([("jobs", "required: a list of job bodies")])
    if not jobs:
        raise InvalidSubmission([("jobs", "give at least one job")])
    if len(jobs) > max_jobs:
        raise InvalidSubmission([("jobs", f"at most {max_jobs} jobs in one batch; this one has {len(jobs)}")])
    out: list[BatchJob | SubmissionError] = []
    for index, item in enumerate(jobs):
        if not isinstance(item, dict):
            out.append(InvalidSubmission([(f"jobs.{index}", "must be a JSON object (a job body)")]))
            continue
        body = dict(item)
        key = body.pop(BATCH_KEY_FIELD, None)
        try:
            if key is not None and not isinstance(key, str):
                raise InvalidSubmission([("Idempotency-Key", "must be a string")])
            out.append(BatchJob(parse_submission(body, key), key))
        except SubmissionError as exc:
            out.append(prefixed(index, exc))
    return out


def created_status(
    job_id: str, tenant: str, request: JobRequest, plan: Plan, created_at: float, released: Sequence[Released]
) -> JobStatus:
    """A new job's status as the create left it, without reading it back: every step waiting, or
    ready when it needs nothing, or queued when the release right after sent it."""
    sent = {r.envelope.subtask_id: r for r in released if r.envelope.job_id == job_id}

    def state(sid: str, needs: list[str]) -> SubtaskState:
        if sid in sent:
            return SubtaskState.queued
        return SubtaskState.waiting if needs else SubtaskState.ready

    return JobStatus(
        id=job_id,
        name=request.name,
        state=JobState.running,
        priority=request.priority,
        tenant=tenant,
        created_at=created_at,
        updated_at=created_at,
        callback_url=str(request.callback_url) if request.callback_url else None,
        deadline_at=created_at + request.deadline_s if request.deadline_s is not None else None,
        subtasks=[
            SubtaskStatus(
                id=st.id,
                plugin=st.plugin,
                action=st.action,
                resource_class=st.resource_class,
                state=state(st.id, st.needs),
                needs=st.needs,
                attempt=1,
                max_attempts=st.retries + 1,
                queue=sent[st.id].queue if st.id in sent else None,
            )
            for st in plan.subtasks
        ],
    )


class Submitter:
    def __init__(
        self,
        store: JobStore,
        planner: Planner,
        goal_planner: LazyGoalPlanner,
        dispatcher: Dispatcher,
        guard: OutboundGuard,
        submitted: Counter,
        require_capable_worker: bool,
    ) -> None:
        self.store = store
        self.planner = planner
        self.goal_planner = goal_planner
        self.dispatcher = dispatcher
        self.guard = guard
        self.submitted = submitted
        self.require_capable_worker = require_capable_worker
        self._nodes: list[NodeInfo] = []
        self._nodes_read_at = -NODES_FRESH_S

    async def submit(self, request: JobRequest, tenant: str, idempotency_key: str | None) -> Outcome:
        if request.callback_url is not None and (
            problem := await callback_url_problem(self.guard, str(request.callback_url))
        ):
            raise InvalidSubmission([("callback_url", problem)])
        # Only a keyed job keeps its request's hash (to compare a resubmission with): none to make otherwise.
        digest = request_hash(request) if idempotency_key else ""
        # Answered before planning: a goal is not planned (by a model) twice.
        if idempotency_key and (existing := self.existing(tenant, idempotency_key, digest)) is not None:
            return existing
        planned = await self.plan_checked(request)
        if problems := artifact_problems(self.store.artifacts, planned.plan, tenant):
            raise InvalidPlan(problems)
        if request.dry_run:
            return DryRun(planned.preview())
        return self.create(request, tenant, idempotency_key, digest, planned)

    def existing(self, tenant: str, idempotency_key: str, digest: str) -> Accepted | None:
        """The job this key already made, or None when the key is new (or its job expired)."""
        found = self.store.find_idempotent(tenant, idempotency_key)
        if found and found[1] != digest:
            raise IdempotencyConflict()
        if found and (status := self.store.get_job(found[0])) is not None:
            return Accepted(status, created=False)
        return None

    def nodes_to_check(self, fresh: bool = False) -> list[NodeInfo] | None:
        """The live nodes a new job's steps must be runnable on, or None when that check is off:
        read at most every NODES_FRESH_S (two round trips and a parse per node, on every submit
        otherwise), or now when `fresh`.

        A resubmission with a known Idempotency-Key never gets here: it is answered
        with its existing job before planning, whatever the fleet looks like now.
        """
        if not self.require_capable_worker:
            return None
        now = time.monotonic()
        if fresh or now - self._nodes_read_at >= NODES_FRESH_S:
            self._nodes, self._nodes_read_at = self.store.nodes.live_nodes(), now
        return self._nodes

    async def plan_checked(self, request: JobRequest) -> Planned:
        """`plan` against the live nodes; a refusal on a view up to NODES_FRESH_S old is planned
        again on a fresh one (a node that has just joined must not be missed), except a goal,
        whose planning is a model call."""
        read_before = self._nodes_read_at
        try:
            return await self.plan(request, self.nodes_to_check())
        except InvalidPlan:
            if request.goal is not None or not self.require_capable_worker or self._nodes_read_at != read_before:
                raise
            return await self.plan(request, self.nodes_to_check(fresh=True))

    async def plan(self, request: JobRequest, nodes: list[NodeInfo] | None) -> Planned:
        """`nodes`: the live nodes the steps must be runnable on (None: no such check)."""
        try:
            if request.goal is not None:
                # A model call: off the event loop.
                goal_plan = await run_in_threadpool(self._plan_goal, request.goal, nodes or [])
                return Planned(goal_plan.plan, goal_plan)
            return Planned(self.planner.plan(request, nodes))
        except PlanError as exc:
            raise InvalidPlan(exc.problems) from None
        except GoalPlanError as exc:
            raise PlanRejected(exc.problems, exc.model, exc.answer) from None
        except NoModelAvailable as exc:
            raise NoModel([("goal", str(exc))]) from None

    def _plan_goal(self, goal: str, nodes: list[NodeInfo]) -> GoalPlan:
        return self.goal_planner.get().plan(goal, nodes=nodes)

    def new_job(self, job: BatchJob, tenant: str, digest: str, planned: Planned) -> NewJob:
        request = job.request
        return NewJob(
            job_id=uuid.uuid4().hex,
            tenant=tenant,
            priority=request.priority,
            name=request.name,
            callback_url=str(request.callback_url) if request.callback_url else None,
            plan=planned.plan,
            request_hash=digest,
            idempotency_key=job.idempotency_key,
            deadline_s=request.deadline_s,
        )

    def create(
        self, request: JobRequest, tenant: str, idempotency_key: str | None, digest: str, planned: Planned
    ) -> Accepted:
        new = self.new_job(BatchJob(request, idempotency_key), tenant, digest, planned)
        [result] = self.store.create_jobs([new])
        # Another submission with the same key won the race with another body.
        if not result.created and result.request_hash != digest:
            raise IdempotencyConflict()
        if not result.created:
            status = self.store.get_job(result.job_id)
            if status is None:  # its job was deleted between the create call and this read
                raise RuntimeError(f"job {result.job_id} vanished right after it was found")
            return Accepted(status, created=False)
        self.submitted.labels(priority=request.priority.value).inc()
        released = self.release(planned.plan)
        return Accepted(created_status(result.job_id, tenant, request, planned.plan, result.created_at, released), True)

    def release(self, plan: Plan | Sequence[Plan]) -> list[Released]:
        """Release the ready steps right away rather than waiting for the release loop's next turn:
        one release (one publish batch) per class the plans start in; what was sent."""
        plans = [plan] if isinstance(plan, Plan) else plan
        classes = {st.resource_class for p in plans for st in p.subtasks if not st.needs}
        released: list[Released] = []
        for resource_class in sorted(classes, key=lambda rc: rc.value):
            released += self.dispatcher.release_items(resource_class)
        return released

    # --- batches ------------------------------------------------------------------------

    async def submit_batch(
        self, jobs: list[BatchJob | SubmissionError], tenant: str, max_subtasks: int
    ) -> list[BatchOutcome]:
        """Each job checked and planned on its own (one bad job refuses only itself), then every
        valid one created in one store call and released with one publish per class.

        An Idempotency-Key's existing job is answered as it is (`created=False`), from one
        pipelined read for the whole batch; a key given twice in one batch makes one job.
        Raises InvalidSubmission (field `jobs`) when the valid jobs plan more than `max_subtasks` subtasks in all."""
        outcomes: list[BatchOutcome | None] = [j if isinstance(j, SubmissionError) else None for j in jobs]
        keys = sorted({j.idempotency_key for j in jobs if isinstance(j, BatchJob) and j.idempotency_key})
        known = self.store.find_idempotent_many(tenant, keys)
        nodes: list[NodeInfo] | None = None
        nodes_read = False  # read once, when the first job is planned (not at all for a batch of repeats)
        ready: list[_Ready] = []
        for index, job in enumerate(jobs):
            if not isinstance(job, BatchJob):
                continue
            try:
                request = job.request
                if request.dry_run:
                    raise InvalidSubmission([("dry_run", "not in a batch; send a dry run to POST /v1/jobs")])
                if request.callback_url is not None and (
                    problem := await callback_url_problem(self.guard, str(request.callback_url))
                ):
                    raise InvalidSubmission([("callback_url", problem)])
                digest = request_hash(request) if job.idempotency_key else ""
                if job.idempotency_key and (seen := known.get(job.idempotency_key)) is not None:
                    if seen.request_hash != digest:
                        raise IdempotencyConflict()
                    outcomes[index] = Placed(seen.job_id, False, JobState(seen.state))
                    continue
                if not nodes_read:
                    nodes, nodes_read = self.nodes_to_check(fresh=True), True
                planned = await self.plan(request, nodes)
                if problems := artifact_problems(self.store.artifacts, planned.plan, tenant):
                    raise InvalidPlan(problems)
                ready.append(_Ready(index, job, digest, planned))
            except SubmissionError as exc:
                outcomes[index] = prefixed(index, exc)
        total = sum(len(r.planned.plan.subtasks) for r in ready)
        if total > max_subtasks:
            raise InvalidSubmission(
                [("jobs", f"the batch plans {total} subtasks; at most {max_subtasks} in one batch")]
            )
        results = self.store.create_jobs([self.new_job(r.job, tenant, r.digest, r.planned) for r in ready])
        created: list[Plan] = []
        made_now = {result.job_id for result in results if result.created}
        for r, result in zip(ready, results, strict=True):
            outcomes[r.index] = self._placed(r, result, made_now)
            if result.created:
                created.append(r.planned.plan)
                self.submitted.labels(priority=r.job.request.priority.value).inc()
        if created:
            self.release(created)
        return [o for o in outcomes if o is not None]

    def _placed(self, r: _Ready, result: CreateResult, made_now: set[str]) -> BatchOutcome:
        if result.created:
            return Placed(result.job_id, True, JobState.running)
        # A key given twice in this batch (or used by another request meanwhile).
        if result.request_hash != r.digest:
            return prefixed(r.index, IdempotencyConflict())
        if result.job_id in made_now:
            return Placed(result.job_id, False, JobState.running)
        state = self.store.job_states([result.job_id]).get(result.job_id)
        return Placed(result.job_id, False, JobState(state or JobState.running.value))
