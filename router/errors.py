"""Every error answer of the router, in one shape: `{"error": ..., "detail": [{"field", "reason"}]}`.

Routes and the submission pipeline raise typed errors; this module alone turns them (and
FastAPI's validation errors, unknown routes, an unreachable Redis, anything unexpected)
into HTTP answers, so that a status code or an error name is decided in one place.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgefleet.router.submission import (
    IdempotencyConflict,
    InvalidPlan,
    InvalidSubmission,
    NoModel,
    PlanRejected,
    SubmissionError,
)
from edgefleet.schemas import ErrorBody

log = logging.getLogger(__name__)

Problem = tuple[str, str]

# Seconds a client should wait before retrying while Redis is unreachable (a restart takes a few).
STORE_RETRY_AFTER = 2
ERROR_NAMES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
}
# Status and error name of each way a submission is refused.
SUBMISSION_ERRORS: dict[type[SubmissionError], tuple[int, str]] = {
    InvalidSubmission: (422, "invalid_request"),
    IdempotencyConflict: (422, "idempotency_conflict"),
    InvalidPlan: (422, "invalid_plan"),
    PlanRejected: (422, "plan_rejected"),
    NoModel: (503, "no_model"),
}


class ApiError(Exception):
    """An error answer a route decides on itself (a bad header, a body that is not JSON, ...)."""

    def __init__(self, status: int, error: str, problems: list[Problem]) -> None:
        super().__init__(f"{status} {error}")
        self.status = status
        self.error = error
        self.problems = problems


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for error answers, all in the documented error shape."""
    return {code: {"model": ErrorBody} for code in codes}


def error_body(error: str, problems: list[Problem]) -> dict[str, Any]:
    return {"error": error, "detail": [{"field": f, "reason": r} for f, r in problems]}


def error_response(status: int, error: str, problems: list[Problem]) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(error, problems))


def submission_error_response(exc: SubmissionError) -> JSONResponse:
    status, error = SUBMISSION_ERRORS[type(exc)]
    body = error_body(error, exc.problems)
    if isinstance(exc, PlanRejected):
        # What the model answered, so that a client can see why its goal was not planned.
        body.update(model=exc.model, model_answer=exc.answer)
    return JSONResponse(status_code=status, content=body)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.error, exc.problems)

    @app.exception_handler(SubmissionError)
    async def _submission(_: Request, exc: SubmissionError) -> JSONResponse:
        return submission_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # A body field is named as it is written in the body ("weights.batch"), like the job API's.
        problems = [
            (".".join(str(p) for p in err["loc"][1 if err["loc"][:1] == ("body",) else 0 :]) or "body", err["msg"])
            for err in exc.errors()
        ]
        if any(err.get("type") == "json_invalid" for err in exc.errors()):
            return error_response(400, "malformed_json", [("body", "not valid JSON")])
        return error_response(422, "invalid_request", problems)

    # Starlette's HTTPException (FastAPI's is a subclass): also unknown routes (404) and wrong methods (405).
    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, list) else [{"field": "", "reason": str(exc.detail)}]
        return JSONResponse(
            status_code=exc.status_code,
            content={"error": ERROR_NAMES.get(exc.status_code, "error"), "detail": detail},
            headers=exc.headers,
        )

    # Redis down or restarting, wherever in a request it shows: a JSON 503 the client may retry.
    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("job store unreachable", extra={"path": request.url.path, "error": type(exc).__name__})
        return JSONResponse(
            status_code=503,
            content={
                "error": "store_unavailable",
                "detail": [{"field": "", "reason": "the job store (Redis) cannot be reached; retry shortly"}],
            },
            headers={"Retry-After": str(STORE_RETRY_AFTER)},
        )

    # Anything else: the error shape, never a traceback or other internals in the answer.
    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", extra={"path": request.url.path}, exc_info=exc)
        return error_response(500, "internal_error", [("", "the router failed to answer; see its log")])
