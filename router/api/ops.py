"""Operations: health, Prometheus metrics, and garbage collection of finished jobs."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from edgefleet.router.auth import AdminPrincipal, require
from edgefleet.router.errors import error_responses
from edgefleet.router.request_body import JsonBody
from edgefleet.router.services import Services
from edgefleet.schemas import GcRequest, GcResult
from edgefleet.settings import Scope

log = logging.getLogger(__name__)

router = APIRouter()


@router.get(
    "/healthz",
    tags=["ops"],
    responses={503: {"description": "Redis unreachable", "content": {"application/json": {"schema": {}}}}},
)
def healthz(services: Services) -> JSONResponse:
    try:
        services.store.ping()
    except Exception as exc:
        return JSONResponse(status_code=503, content={"status": "degraded", "redis": type(exc).__name__})
    return JSONResponse({"status": "ok", "redis": "ok"})


@router.get("/metrics", tags=["ops"], dependencies=[Depends(require(Scope.read))], response_class=PlainTextResponse)
def metrics(services: Services) -> Response:
    body, content_type = services.metrics.render()
    return Response(content=body, media_type=content_type)


@router.post("/v1/admin/gc", tags=["admin"], response_model=GcResult, responses=error_responses(400, 415))
def collect_garbage(_: AdminPrincipal, _json: JsonBody, services: Services, body: GcRequest | None = None) -> GcResult:
    """Delete finished jobs (their subtasks, events, idempotency keys) now (admin), at most
    `limit` per call; call again while `remaining` > 0. The router also does this every
    `EDGEFLEET_GC_INTERVAL` seconds for jobs older than `EDGEFLEET_JOB_RETENTION`."""
    body = body or GcRequest()
    older_than = services.settings.job_retention if body.older_than is None else body.older_than
    batch = services.store.gc(older_than=older_than, limit=body.limit)
    if batch.removed:
        log.info("expired finished jobs on request", extra={"count": len(batch.removed), "older_than": older_than})
    return GcResult(removed=batch.removed, remaining=batch.remaining, older_than=older_than)
