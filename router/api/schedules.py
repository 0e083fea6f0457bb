"""Schedules: a job body run on a cron expression or an interval; create, list, read, pause, resume, delete.

Tenancy as for jobs: a token sees and changes its tenant's schedules (admin: all), and the
jobs a schedule makes belong to the tenant that made it.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import ValidationError

from edgefleet.router.api.jobs import _read_json
from edgefleet.router.auth import ReadPrincipal, SubmitPrincipal
from edgefleet.router.errors import error_responses
from edgefleet.router.openapi import REF_TEMPLATE
from edgefleet.router.planner import pydantic_problems
from edgefleet.router.services import Services
from edgefleet.router.submission import InvalidSubmission
from edgefleet.schedule_schemas import SchedulePage, ScheduleRequest, ScheduleStatus

router = APIRouter(prefix="/v1/schedules", tags=["schedules"])

ScheduleId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="the id POST /v1/schedules answered")]


def _body_schema() -> dict[str, Any]:
    """ScheduleRequest for the OpenAPI document: the route reads its body itself (size cap,
    strict JSON), so FastAPI does not see the model; the models it refers to (JobRequest and
    its parts, the policies) are components already."""
    schema = ScheduleRequest.model_json_schema(ref_template=REF_TEMPLATE)
    schema.pop("$defs", None)
    return schema


@router.post(
    "",
    status_code=201,
    response_model=ScheduleStatus,
    responses=error_responses(400, 409, 413, 415),
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _body_schema()}}}},
)
async def create_schedule(
    request: Request, principal: SubmitPrincipal, services: Services, response: Response
) -> ScheduleStatus:
    """Run a job body (`steps`, or `template` and `inputs`) on `cron` or every `interval_s`.

    The job is checked as POST /v1/jobs would check it (a 422 names the field, e.g.
    `job.template`), as are the cron expression, the minimum interval and the time zone."""
    # The same reader as POST /v1/jobs: the size cap holds before the body is parsed.
    data = await _read_json(request, services.settings.max_body_bytes)
    try:
        spec = ScheduleRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidSubmission(pydantic_problems(exc)) from None
    status = await services.schedules.create(spec, principal.tenant)
    response.headers["Location"] = f"/v1/schedules/{status.id}"
    return status


@router.get("", response_model=SchedulePage)
def list_schedules(
    principal: ReadPrincipal, services: Services, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> SchedulePage:
    """Newest first, each with its next fire times and its last run."""
    tenant = None if principal.is_admin else principal.tenant
    return SchedulePage(schedules=services.schedules.list(tenant, limit))


@router.get("/{schedule_id}", response_model=ScheduleStatus, responses=error_responses(404))
def get_schedule(
    schedule_id: ScheduleId,
    principal: ReadPrincipal,
    services: Services,
    runs: Annotated[int, Query(ge=0, le=10_000, description="last runs shown, newest first")] = 20,
) -> ScheduleStatus:
    return services.schedules.visible(schedule_id, principal.tenant, principal.is_admin, runs)


@router.delete("/{schedule_id}", status_code=204, response_class=Response, responses=error_responses(404))
def delete_schedule(schedule_id: ScheduleId, principal: SubmitPrincipal, services: Services) -> Response:
    """No more fire times; the jobs it made stay."""
    services.schedules.delete(schedule_id, principal.tenant, principal.is_admin)
    return Response(status_code=204)


@router.post("/{schedule_id}/pause", response_model=ScheduleStatus, responses=error_responses(404))
def pause_schedule(schedule_id: ScheduleId, principal: SubmitPrincipal, services: Services) -> ScheduleStatus:
    """No job is made until it is resumed; a job running now goes on."""
    return services.schedules.pause(schedule_id, principal.tenant, principal.is_admin)


@router.post("/{schedule_id}/resume", response_model=ScheduleStatus, responses=error_responses(404))
def resume_schedule(schedule_id: ScheduleId, principal: SubmitPrincipal, services: Services) -> ScheduleStatus:
    """Fires again from the next fire time after now; those that passed while paused are not run."""
    return services.schedules.resume(schedule_id, principal.tenant, principal.is_admin)
