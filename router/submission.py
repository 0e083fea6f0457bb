"""Submitting a job: validate → idempotency → plan → dry run → create → release.

Plain code with typed inputs and outcomes, no HTTP: a refusal is a `SubmissionError`
subclass carrying `(field, reason)` problems, which `router.errors` turns into the
answer's status and body. The jobs route only reads the body and shapes the outcome.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from edgefleet.models.errors import NoModelAvailable
from edgefleet.netguard import OutboundGuard
from edgefleet.scheduling.dispatch import Dispatcher
from edgefleet.schemas import JobRequest, JobStatus, NodeInfo, Plan, PlanPreview, StepSpec
from edgefleet.store import JobStore
from router.artifact_inputs import artifact_problems
from router.goal_planner import GoalPlan, GoalPlanError
from router.model_access import LazyGoalPlanner
from router.planner import PlanError, Planner, Problem, pydantic_problems
from router.webhooks import callback_url_problem

IDEMPOTENCY_KEY_MAX = 200
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
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
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

    async def submit(self, request: JobRequest, tenant: str, idempotency_key: str | None) -> Outcome:
        if request.callback_url is not None and (
            problem := await callback_url_problem(self.guard, str(request.callback_url))
        ):
            raise InvalidSubmission([("callback_url", problem)])
        digest = request_hash(request)
        # Answered before planning: a goal is not planned (by a model) twice.
        if idempotency_key and (existing := self.existing(tenant, idempotency_key, digest)) is not None:
            return existing
        planned = await self.plan(request)
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

    def nodes_to_check(self) -> list[NodeInfo] | None:
        """The live nodes a new job's steps must be runnable on, or None when that check is off.

        A resubmission with a known Idempotency-Key never gets here: it is answered
        with its existing job before planning, whatever the fleet looks like now.
        """
        return self.store.nodes.live_nodes() if self.require_capable_worker else None

    async def plan(self, request: JobRequest) -> Planned:
        nodes = self.nodes_to_check()
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

    def create(
        self, request: JobRequest, tenant: str, idempotency_key: str | None, digest: str, planned: Planned
    ) -> Accepted:
        result = self.store.create_job(
            job_id=uuid.uuid4().hex,
            tenant=tenant,
            priority=request.priority,
            name=request.name,
            callback_url=str(request.callback_url) if request.callback_url else None,
            plan=planned.plan,
            request_json=json.dumps(request.model_dump(mode="json")),
            request_hash=digest,
            idempotency_key=idempotency_key,
            deadline_s=request.deadline_s,
        )
        # Another submission with the same key won the race with another body.
        if not result.created and result.request_hash != digest:
            raise IdempotencyConflict()
        if result.created:
            self.submitted.labels(priority=request.priority.value).inc()
            self.release(planned.plan)
        status = self.store.get_job(result.job_id)
        if status is None:  # created a moment ago: only a flushed Redis loses it
            raise RuntimeError(f"job {result.job_id} vanished right after it was stored")
        return Accepted(status, created=result.created)

    def release(self, plan: Plan) -> None:
        """Release the ready steps right away rather than waiting for the release loop's next turn."""
        for resource_class in {st.resource_class for st in plan.subtasks if not st.needs}:
            self.dispatcher.release(resource_class)
