"""Jobs: submit, list, read, cancel, and follow one job's events (SSE)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from edgefleet.schemas import ErrorBody, JobPage, JobState, JobStatus, PlanPreview
from router.auth import Principal, ReadPrincipal, SubmitPrincipal
from router.errors import ApiError, error_responses
from router.events import job_event_stream
from router.openapi import REF_TEMPLATE
from router.request_body import MAX_JSON_DEPTH, JsonTooDeep, content_type_problem, parse_json, read_limited_body
from router.services import RouterServices, Services
from router.submission import DryRun, parse_submission

CURSOR = r"^\d{1,12}(\.\d{1,9})?_[0-9a-f]{32}$"  # `next_cursor` of a page: <created_at>_<job id>
STREAM_ID = re.compile(r"\d{1,19}(-\d{1,19})?")  # a Redis stream id, as SSE sends it back

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


async def _read_json(request: Request, max_bytes: int) -> Any:
    """The body as strict JSON: it must say it is JSON, fit in `max_bytes` and parse."""
    if (problem := content_type_problem(request.headers.get("content-type"))) is not None:
        raise ApiError(415, "unsupported_media_type", [("Content-Type", problem)])
    raw = await read_limited_body(request, max_bytes)
    if raw is None:
        raise ApiError(413, "payload_too_large", [("body", f"larger than {max_bytes} bytes")])
    try:
        return parse_json(raw)
    except JsonTooDeep:
        raise ApiError(422, "invalid_request", [("body", f"nested deeper than {MAX_JSON_DEPTH} levels")]) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN, huge numbers
        raise ApiError(400, "malformed_json", [("body", f"not valid JSON: {exc}")]) from None


def _visible_job(services: RouterServices, principal: Principal, job_id: str) -> JobStatus:
    status = services.store.get_job(job_id)
    # Another tenant's job is reported as missing, not forbidden: ids are not an oracle.
    if status is None or (not principal.is_admin and status.tenant != principal.tenant):
        raise HTTPException(404, detail=[{"field": "job_id", "reason": f"no job {job_id!r}"}])
    return status


@router.post(
    "",
    status_code=201,
    response_model=JobStatus,
    responses={
        200: {"model": JobStatus | PlanPreview, "description": "an Idempotency-Key's existing job, or a dry run"},
        **error_responses(400, 413, 415),
        503: {"model": ErrorBody, "description": "store_unavailable, or no_model to plan a goal"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": REF_TEMPLATE.format(model="JobRequest")}}},
        }
    },
)
async def submit_job(
    request: Request,
    principal: SubmitPrincipal,
    services: Services,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Response:
    data = await _read_json(request, services.settings.max_body_bytes)
    job_request = parse_submission(data, idempotency_key)
    outcome = await services.submitter.submit(job_request, principal.tenant, idempotency_key)
    if isinstance(outcome, DryRun):
        return JSONResponse(status_code=200, content=outcome.preview.model_dump(mode="json"))
    return JSONResponse(
        status_code=201 if outcome.created else 200,
        content=outcome.status.model_dump(mode="json"),
        headers={"Location": f"/v1/jobs/{outcome.status.id}"},
    )


@router.get("", response_model=JobPage)
def list_jobs(
    principal: ReadPrincipal,
    services: Services,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(pattern=CURSOR, description="next_cursor of the previous page")] = None,
) -> JobPage:
    tenant = None if principal.is_admin else principal.tenant
    return services.store.list_jobs(tenant=tenant, state=state, limit=limit, cursor=cursor)


@router.get("/{job_id}", response_model=JobStatus)
def get_job(job_id: str, principal: ReadPrincipal, services: Services) -> JobStatus:
    return _visible_job(services, principal, job_id)


@router.delete("/{job_id}", response_model=JobStatus, status_code=202)
def cancel_job(job_id: str, principal: SubmitPrincipal, services: Services) -> JobStatus:
    current = _visible_job(services, principal, job_id)
    if current.state in (JobState.succeeded, JobState.failed):
        raise HTTPException(
            409, detail=[{"field": "job_id", "reason": f"job already {current.state.value}; nothing to cancel"}]
        )
    services.store.cancel_job(job_id)
    return _visible_job(services, principal, job_id)


@router.get("/{job_id}/events", response_class=EventSourceResponse)
async def job_events(
    job_id: str,
    principal: ReadPrincipal,
    services: Services,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Response:
    _visible_job(services, principal, job_id)
    if last_event_id is not None and not STREAM_ID.fullmatch(last_event_id):
        raise ApiError(422, "invalid_request", [("Last-Event-ID", "must be an event id like '1712345678901-0'")])
    stream = job_event_stream(services.events, job_id, last_event_id or "0")
    return EventSourceResponse(stream, ping=15)
