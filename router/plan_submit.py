"""Submitting a goal: a model's plan runs unconfirmed only when it passed the trust check.

`GoalSubmitter` is the router's `Submitter` with the goal rules on top, so that the jobs route and
the submission pipeline stay as they are:

* a dry run shows the plan with who planned it, its candidates, and whether (and why) it would
  run unconfirmed (`GoalPlanPreview`);
* without a dry run, an untrusted plan is held (`GoalHeld`, answered 202 `requires_confirmation`)
  until `POST /v1/jobs/{id}/confirm`, or until the client submits the returned plan itself;
* in a batch, where there is no one to ask, an untrusted goal plan is refused for that job;
* a refused goal (`GoalRefused`) or an overflowing plan (`PlanTooLong`) is a 422 (see `router.api.goals`).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

from pydantic import Field
from starlette.concurrency import run_in_threadpool

from edgefleet.router.goal_planner import GoalPlan, GoalRefused, PlanTooLong
from edgefleet.router.plan_holds import HeldPlans, Hold
from edgefleet.router.planner import PlanError
from edgefleet.router.submission import Accepted, InvalidPlan, Planned, Submitter
from edgefleet.schemas import JobRequest, PlannedSubtask, PlanPreview, StepSpec

# Set while a batch is planned: no one is there to confirm a held plan.
_IN_BATCH: contextvars.ContextVar[bool] = contextvars.ContextVar("edgefleet_goal_in_batch", default=False)


class GoalPlanPreview(PlanPreview):
    """A dry run of a goal: the plan, who planned it, and whether it would run without confirmation."""

    plan: dict[str, Any] = Field(description="the plan as it can be submitted: {template, inputs} or {steps}")
    candidates: list[str] = Field(description="the templates and actions the goal was planned from")
    trusted: bool = Field(description="the plan passed the check that it serves the goal")
    trust: list[str] = Field(description="why the plan is trusted, or why not")
    requires_confirmation: bool


# The parent's fields name these types; this module's namespace must resolve them too.
GoalPlanPreview.model_rebuild(_types_namespace={"PlannedSubtask": PlannedSubtask, "StepSpec": StepSpec})


@dataclass(frozen=True)
class GoalPlanned(Planned):
    def preview(self) -> PlanPreview:
        base = super().preview()
        goal = self.goal_plan
        if goal is None:
            return base
        return GoalPlanPreview(
            **base.model_dump(),
            plan=goal.body,
            candidates=goal.candidates,
            trusted=goal.trusted,
            trust=goal.verdict.reasons,
            requires_confirmation=not goal.trusted,
        )


@dataclass(frozen=True)
class HeldGoal:
    request: JobRequest
    idempotency_key: str | None
    digest: str
    planned: GoalPlanned


class GoalHeld(Exception):
    """Raised instead of creating the job: the plan waits for a person (answered 202 by `router.api.goals`)."""

    def __init__(self, hold: Hold, goal_plan: GoalPlan, planned: GoalPlanned) -> None:
        super().__init__(f"goal plan {hold.id} held for confirmation")
        self.hold = hold
        self.goal_plan = goal_plan
        self.planned = planned


def held_body(hold: Hold, ttl: float) -> dict[str, Any]:
    payload: HeldGoal = hold.payload
    preview = payload.planned.preview().model_dump(mode="json")
    preview.pop("dry_run", None)
    return {
        "id": hold.id,
        "state": "held",
        "confirm_url": f"/v1/jobs/{hold.id}/confirm",
        "expires_in_s": ttl,
        **preview,
    }


class GoalSubmitter(Submitter):
    def __init__(self, *args: Any, holds: HeldPlans | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.holds = holds or HeldPlans()

    async def plan(self, request: JobRequest, *args: Any, **kwargs: Any) -> Planned:
        # The arguments after `request` (the live nodes) pass through as the submitter defines them.
        try:
            planned = await super().plan(request, *args, **kwargs)
        except (GoalRefused, PlanTooLong) as exc:
            if _IN_BATCH.get():
                raise InvalidPlan([("goal", exc.reason)]) from None
            raise
        if planned.goal_plan is None:
            return planned
        goal_planned = GoalPlanned(planned.plan, planned.goal_plan)
        if _IN_BATCH.get() and not planned.goal_plan.trusted:
            reasons = "; ".join(planned.goal_plan.verdict.reasons)
            raise InvalidPlan(
                [("goal", f"the model's plan needs a person to confirm it ({reasons}); submit the goal alone")]
            )
        return goal_planned

    async def submit_batch(self, *args: Any, **kwargs: Any) -> Any:
        token = _IN_BATCH.set(True)
        try:
            return await super().submit_batch(*args, **kwargs)
        finally:
            _IN_BATCH.reset(token)

    def create(
        self, request: JobRequest, tenant: str, idempotency_key: str | None, digest: str, planned: Planned
    ) -> Accepted:
        goal = planned.goal_plan
        if goal is not None and not goal.trusted and isinstance(planned, GoalPlanned):
            hold = self.holds.put(tenant, HeldGoal(request, idempotency_key, digest, planned))
            raise GoalHeld(hold, goal, planned)
        return super().create(request, tenant, idempotency_key, digest, planned)

    async def confirm(self, hold_id: str, tenant: str | None) -> Accepted | None:
        """Make the job of a held plan (None when there is no such hold for `tenant`).

        The plan is checked again against the fleet as it is now; InvalidPlan keeps the hold.
        """
        hold = self.holds.take(hold_id, tenant)
        if hold is None:
            return None
        held: HeldGoal = hold.payload
        try:
            request = JobRequest(steps=held.planned.preview().steps)
            plan = await run_in_threadpool(self.planner.plan, request, self.nodes_to_check())
        except PlanError as exc:
            self.holds.put_back(hold)
            raise InvalidPlan(exc.problems) from None
        planned = Planned(plan, held.planned.goal_plan)
        return Submitter.create(self, held.request, hold.tenant, held.idempotency_key, held.digest, planned)
