"""Goals: confirm a held goal plan, and the answers for goals that are refused, too long or held.

A goal is submitted through `POST /v1/jobs` like any job (see `router.plan_submit`); this module
adds what a goal needs beyond it, so that the jobs route stays the same for every kind of job.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from edgefleet.router.auth import SubmitPrincipal
from edgefleet.router.errors import error_body, error_responses
from edgefleet.router.goal_planner import GoalRefused, PlanTooLong
from edgefleet.router.plan_submit import GoalHeld, GoalSubmitter, held_body
from edgefleet.router.services import Services
from edgefleet.schemas import ErrorBody, JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post(
    "/{hold_id}/confirm",
    status_code=201,
    response_model=JobStatus,
    responses={
        404: {"model": ErrorBody, "description": "no held plan with this id (expired, or held by another router)"},
        **error_responses(422),
    },
)
async def confirm_goal_plan(hold_id: str, principal: SubmitPrincipal, services: Services) -> JSONResponse:
    """Run a goal plan that was held for confirmation (the `id` of a 202 `requires_confirmation` answer)."""
    submitter = services.submitter
    tenant = None if principal.is_admin else principal.tenant
    accepted = await submitter.confirm(hold_id, tenant) if isinstance(submitter, GoalSubmitter) else None
    if accepted is None:
        return JSONResponse(
            status_code=404,
            content=error_body(
                "not_found",
                [
                    (
                        "hold_id",
                        f"no held plan {hold_id!r} here: it expired, was confirmed, or another router holds it; submit its plan instead",
                    )
                ],
            ),
        )
    return JSONResponse(
        status_code=201 if accepted.created else 200,
        content=accepted.status.model_dump(mode="json"),
        headers={"Location": f"/v1/jobs/{accepted.status.id}"},
    )


def install_goal_answers(app: FastAPI) -> None:
    """The answers of a goal that is refused (422), too long to plan (422) or held (202)."""

    @app.exception_handler(GoalRefused)
    async def _refused(_: Request, exc: GoalRefused) -> JSONResponse:
        body = error_body("goal_not_plannable", [("goal", exc.reason)])
        body["model"] = exc.model
        return JSONResponse(status_code=422, content=body)

    @app.exception_handler(PlanTooLong)
    async def _too_long(_: Request, exc: PlanTooLong) -> JSONResponse:
        body = error_body("plan_too_long", [("goal", exc.reason)])
        body["model"] = exc.model
        return JSONResponse(status_code=422, content=body)

    @app.exception_handler(GoalHeld)
    async def _held(request: Request, exc: GoalHeld) -> JSONResponse:
        # Raised from the submitter's create step: the plan is valid but no one checked it serves the goal.
        submitter = request.app.state.services.submitter
        ttl = submitter.holds.ttl if isinstance(submitter, GoalSubmitter) else 0.0
        return JSONResponse(
            status_code=202, content=held_body(exc.hold, ttl), headers={"Location": f"/v1/jobs/{exc.hold.id}/confirm"}
        )
