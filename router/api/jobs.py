"""Jobs: submit, list, read, cancel, and follow one job's events (SSE)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field
from sse_starlette.sse import EventSourceResponse

from edgefleet.router.auth import Principal, ReadPrincipal, SubmitPrincipal
from edgefleet.router.errors import SUBMISSION_ERRORS, ApiError, error_responses
from edgefleet.router.events import job_event_stream
from edgefleet.router.openapi import REF_TEMPLATE
from edgefleet.router.request_body import (
    MAX_JSON_DEPTH,
    JsonTooDeep,
    content_type_problem,
    parse_json,
    read_limited_body,
)
from edgefleet.router.services import RouterServices, Services
from edgefleet.router.submission import (
    IDEMPOTENCY_KEY_MAX,
    BatchOutcome,
    DryRun,
    Placed,
    parse_batch,
    parse_submission,
)
from edgefleet.schemas import ErrorBody, ErrorItem, JobPage, JobRequest, JobState, JobStatus, PlanPreview

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


def _json(model: BaseModel, status_code: int, headers: dict[str, str] | None = None) -> Response:
    """A model as JSON, serialized by pydantic-core (Rust) straight to bytes: no dict, no stdlib json."""
    return Response(model.model_dump_json(), status_code, headers, media_type="application/json")


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
        return _json(outcome.preview, 200)
    return _json(outcome.status, 201 if outcome.created else 200, {"Location": f"/v1/jobs/{outcome.status.id}"})


class BatchJobRequest(JobRequest):
    """One job of a batch: a job body, plus its own Idempotency-Key."""

    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=IDEMPOTENCY_KEY_MAX,
        description="as the Idempotency-Key header of POST /v1/jobs: the same key and body give the same job",
    )


class BatchResult(BaseModel):
    """One job of the batch, at its index: its job (`id`), or why it was refused (`error`, `detail`)."""

    index: int
    status: int = Field(description="as POST /v1/jobs would answer it: 201 created, 200 an existing job, else 4xx/5xx")
    id: str | None = None
    created: bool | None = Field(default=None, description="false: an Idempotency-Key's earlier job")
    state: JobState | None = None
    error: str | None = None
    detail: list[ErrorItem] = Field(default_factory=list)


class BatchAnswer(BaseModel):
    created: int = Field(description="jobs created by this request")
    existing: int = Field(description="jobs an Idempotency-Key had already made")
    rejected: int = Field(description="jobs refused; each result says why")
    results: list[BatchResult] = Field(description="one per job, in the order sent")


def _batch_result(index: int, outcome: BatchOutcome) -> BatchResult:
    if isinstance(outcome, Placed):
        status = 201 if outcome.created else 200
        return BatchResult(index=index, status=status, id=outcome.job_id, created=outcome.created, state=outcome.state)
    status, error = SUBMISSION_ERRORS[type(outcome)]
    detail = [ErrorItem(field=f, reason=r) for f, r in outcome.problems]
    return BatchResult(index=index, status=status, error=error, detail=detail)


_BATCH_ITEM_SCHEMA = BatchJobRequest.model_json_schema(ref_template=REF_TEMPLATE)
_BATCH_ITEM_SCHEMA.pop("$defs", None)  # the same models as JobRequest's, in components/schemas


@router.post(
    ":batch",
    status_code=200,
    response_model=BatchAnswer,
    summary="Submit many jobs",
    description="Up to `EDGEFLEET_BATCH_MAX_JOBS` jobs (default 500) in one request, each a job body as "
    "POST /v1/jobs takes, with its own optional `idempotency_key`. Each job is checked on its own: "
    "**a job that is refused refuses only itself**, the others are created (in one store call, their first "
    "steps released in one publish). The answer lists every job by its index: its `id`, or its `error` and "
    "`detail` with fields named from the batch body (`jobs.3.steps.0.plugin`). A key given twice with the "
    "same body gives one job; with another body the second is an `idempotency_conflict`. Dry runs are not "
    "taken in a batch. The request as a whole is refused (422, field `jobs`) when it is not a list of "
    "1 to EDGEFLEET_BATCH_MAX_JOBS jobs, or when its jobs plan more than EDGEFLEET_BATCH_MAX_SUBTASKS "
    "subtasks in all; then no job is created.",
    responses={**error_responses(400, 413, 415)},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["jobs"],
                        "additionalProperties": False,
                        "properties": {"jobs": {"type": "array", "minItems": 1, "items": _BATCH_ITEM_SCHEMA}},
                    }
                }
            },
        }
    },
)
async def submit_jobs(request: Request, principal: SubmitPrincipal, services: Services) -> Response:
    settings = services.settings
    data = await _read_json(request, settings.batch_max_body_bytes)
    jobs = parse_batch(data, settings.batch_max_jobs)
    outcomes = await services.submitter.submit_batch(jobs, principal.tenant, settings.batch_max_subtasks)
    results = [_batch_result(i, o) for i, o in enumerate(outcomes)]
    answer = BatchAnswer(
        created=sum(1 for r in results if r.created),
        existing=sum(1 for r in results if r.created is False),
        rejected=sum(1 for r in results if r.error is not None),
        results=results,
    )
    return _json(answer, 200)


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
