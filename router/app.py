"""The router's HTTP API (FastAPI). `create_app` wires parts; handlers stay thin."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis.asyncio as aioredis
import redis.exceptions
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgefleet.celery_app import create_celery
from edgefleet.dispatch import Dispatcher
from edgefleet.model_affinity import build_affinity
from edgefleet.plugin_catalog import PluginCatalog
from edgefleet.models.router import NoModelAvailable
from edgefleet.priority import DEFAULT_WEIGHTS, validate_weights
from edgefleet.schemas import (
    ErrorBody, GcRequest, GcResult, JobPage, JobRequest, JobState, JobStatus, NodeInfo, Plan, PlanPreview,
    ResourceClass, SchedulerWeightsChange, StepSpec,
)
from edgefleet.settings import Scope, Settings
from edgefleet.store import JobStore
from router.auth import Principal, require
from router.events import SOCKET_TIMEOUT, job_event_stream
from router.feedback import start_feedback
from router.goal_planner import GoalPlanError
from router.model_access import goal_planner_of
from router.loops import RouterLoops
from router.metrics import RouterMetrics
from router.planner import PlanError, Planner, pydantic_problems
from router.request_body import (
    MAX_JSON_DEPTH, JsonTooDeep, content_type_problem, parse_json, read_limited_body, require_json,
)
from router.retention import RetentionSweeper
from edgefleet.templates import TemplateCatalog
from router import webhooks_api
from router.webhooks import callback_url_problem

log = logging.getLogger(__name__)

IDEMPOTENCY_KEY_MAX = 200
STREAM_ID = re.compile(r"\d{1,19}(-\d{1,19})?")  # a Redis stream id, as SSE sends it back
SubmitPrincipal = Annotated[Principal, Depends(require(Scope.submit))]
ReadPrincipal = Annotated[Principal, Depends(require(Scope.read))]
AdminPrincipal = Annotated[Principal, Depends(require(Scope.admin))]
# Declared after the principal, so that a request without a token is a 401 before it is a 415.
JsonBody = Annotated[None, Depends(require_json)]
# Seconds a client should wait before retrying while Redis is unreachable (a restart takes a few).
STORE_RETRY_AFTER = 2
ERROR_NAMES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request",
}
REF_TEMPLATE = "#/components/schemas/{model}"


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for error answers, all in the documented error shape."""
    return {code: {"model": ErrorBody} for code in codes}


def _error(status: int, error: str, problems: list[tuple[str, str]]) -> JSONResponse:
    body = {"error": error, "detail": [{"field": f, "reason": r} for f, r in problems]}
    return JSONResponse(status_code=status, content=body)


def request_hash(request: JobRequest) -> str:
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = JobStore.from_url(settings.redis_url, settings.key_prefix, retention=settings.job_retention)
        plugins = PluginCatalog.load(settings.plugin_folders)
        for problem in plugins.errors:
            log.warning("plugin not loaded", extra={"problem": str(problem)})
        templates = TemplateCatalog.load(settings.plugin_folders)
        celery = create_celery(settings, main="edgefleet-router")
        router_id = settings.router_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        metrics = RouterMetrics(store, router_id)
        dispatcher = Dispatcher(store, celery, settings, build_affinity(store, plugins, settings))
        # Weights live in Redis; this router's settings only fill in what is not there yet.
        store.seed_weights({**DEFAULT_WEIGHTS, **settings.scheduler_weights})
        loops = RouterLoops(
            store, dispatcher, settings, metrics.released, metrics.requeued, metrics.callbacks,
            router_id=router_id,
        )
        app.state.router_id = router_id
        app.state.loops = loops
        app.state.store = store
        app.state.aredis = aioredis.Redis.from_url(
            settings.redis_url, decode_responses=True, socket_timeout=SOCKET_TIMEOUT
        )
        app.state.plugins = plugins
        app.state.templates = templates
        app.state.planner = Planner(plugins, templates, settings)
        app.state.dispatcher = dispatcher
        app.state.metrics = metrics
        loops.start()
        app.state.retention = RetentionSweeper(store, settings.gc_interval)
        app.state.retention.start()
        app.state.feedback = start_feedback(app, store, settings, metrics, lambda: loops.leading)
        log.info("router started", extra={"plugins": plugins.names(), "templates": templates.names()})
        try:
            yield
        finally:
            app.state.feedback.stop()
            app.state.retention.stop()
            loops.stop()
            await app.state.aredis.aclose()
            store.redis.close()

    app = FastAPI(
        title="edgefleet router",
        version="0.1.0",
        description="Submit jobs, watch them run across the fleet.",
        lifespan=lifespan,
        # Every route may answer these, in the error shape (this also replaces FastAPI's own 422 schema).
        responses=_errors(401, 403, 422, 503),
    )
    app.state.settings = settings
    _install_error_handlers(app)
    _install_routes(app, settings)
    app.include_router(webhooks_api.router)
    _install_openapi(app)
    return app


def _install_openapi(app: FastAPI) -> None:
    """POST /v1/jobs reads its body itself (size cap, strict JSON), so FastAPI never sees its model:
    JobRequest and the models it refers to are added to the schema's components, where the
    operation's `$ref` points, so that schema-driven clients and fuzzers can resolve them."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            job_request = JobRequest.model_json_schema(ref_template=REF_TEMPLATE)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in {**job_request.pop("$defs", {}), "JobRequest": job_request}.items():
                components.setdefault(name, definition)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # A body field is named as it is written in the body ("weights.batch"), like the job API's.
        problems = [
            (".".join(str(p) for p in err["loc"][1 if err["loc"][:1] == ("body",) else 0:]) or "body", err["msg"])
            for err in exc.errors()
        ]
        if any(err.get("type") == "json_invalid" for err in exc.errors()):
            return _error(400, "malformed_json", [("body", "not valid JSON")])
        return _error(422, "invalid_request", problems)

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
        return _error(500, "internal_error", [("", "the router failed to answer; see its log")])


def _steps_from_plan(plan: Plan) -> list[StepSpec]:
    return [
        StepSpec(
            id=st.id, plugin=st.plugin, action=st.action, args=st.args, needs=st.needs,
            resource_class=st.resource_class, node=st.node, timeout=st.timeout,
            retries=st.retries, retry_backoff=st.retry_backoff,
        )
        for st in plan.subtasks
    ]


def _nodes_to_check(store: JobStore, settings: Settings) -> list[NodeInfo] | None:
    """The live nodes a new job's steps must be runnable on, or None when that check is off.

    A resubmission with a known Idempotency-Key never gets here: it is answered
    with its existing job before planning, whatever the fleet looks like now.
    """
    if not settings.require_capable_worker:
        return None
    return store.live_nodes()


def _visible_job(request: Request, principal: Principal, job_id: str) -> JobStatus:
    store: JobStore = request.app.state.store
    status = store.get_job(job_id)
    # Another tenant's job is reported as missing, not forbidden: ids are not an oracle.
    if status is None or (not principal.is_admin and status.tenant != principal.tenant):
        raise HTTPException(404, detail=[{"field": "job_id", "reason": f"no job {job_id!r}"}])
    return status


def _install_routes(app: FastAPI, settings: Settings) -> None:
    @app.get(
        "/healthz",
        tags=["ops"],
        responses={503: {"description": "Redis unreachable", "content": {"application/json": {"schema": {}}}}},
    )
    def healthz(request: Request) -> JSONResponse:
        try:
            request.app.state.store.ping()
        except Exception as exc:  # noqa: BLE001 - health reports, never raises
            return JSONResponse(status_code=503, content={"status": "degraded", "redis": type(exc).__name__})
        return JSONResponse({"status": "ok", "redis": "ok"})

    @app.get("/metrics", tags=["ops"], dependencies=[Depends(require(Scope.read))], response_class=PlainTextResponse)
    def metrics(request: Request) -> Response:
        body, content_type = request.app.state.metrics.render()
        return Response(content=body, media_type=content_type)

    @app.post(
        "/v1/jobs",
        tags=["jobs"],
        status_code=201,
        response_model=JobStatus,
        responses={
            200: {"model": JobStatus | PlanPreview, "description": "an Idempotency-Key's existing job, or a dry run"},
            **_errors(400, 413, 415),
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
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> Response:
        if (problem := content_type_problem(request.headers.get("content-type"))) is not None:
            return _error(415, "unsupported_media_type", [("Content-Type", problem)])
        raw = await read_limited_body(request, settings.max_body_bytes)
        if raw is None:
            return _error(413, "payload_too_large", [("body", f"larger than {settings.max_body_bytes} bytes")])
        try:
            data = parse_json(raw)
        except JsonTooDeep:
            return _error(422, "invalid_request", [("body", f"nested deeper than {MAX_JSON_DEPTH} levels")])
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN, huge numbers
            return _error(400, "malformed_json", [("body", f"not valid JSON: {exc}")])
        if not isinstance(data, dict):
            return _error(422, "invalid_request", [("body", "must be a JSON object")])
        if idempotency_key is not None and not (0 < len(idempotency_key) <= IDEMPOTENCY_KEY_MAX):
            return _error(422, "invalid_request", [("Idempotency-Key", f"1 to {IDEMPOTENCY_KEY_MAX} characters")])
        store: JobStore = request.app.state.store
        try:
            job_request = JobRequest.model_validate(data)
        except ValidationError as exc:
            return _error(422, "invalid_request", pydantic_problems(exc))
        # Before a goal is planned (by a model that may be absent): one way to say what to run.
        given = [k for k in ("steps", "template", "goal") if getattr(job_request, k) is not None]
        if len(given) != 1:
            reason = "give exactly one of 'steps', 'template' or 'goal'"
            conflict = f"{reason}; this body has {' and '.join(repr(k) for k in given)}" if given else reason
            return _error(422, "invalid_request", [(k, conflict) for k in given or ["steps"]])
        if job_request.callback_url is not None and (
            problem := await callback_url_problem(request.app, str(job_request.callback_url))
        ):
            return _error(422, "invalid_request", [("callback_url", problem)])
        digest = request_hash(job_request)
        if idempotency_key:
            # Answered before planning: a goal is not planned (by a model) twice.
            existing = store.find_idempotent(principal.tenant, idempotency_key)
            if existing and existing[1] != digest:
                return _error(
                    422, "idempotency_conflict", [("Idempotency-Key", "already used for a different request body")]
                )
            if existing and (status := store.get_job(existing[0])) is not None:
                return JSONResponse(
                    status_code=200,
                    content=status.model_dump(mode="json"),
                    headers={"Location": f"/v1/jobs/{existing[0]}"},
                )
        nodes = _nodes_to_check(store, settings)
        goal_plan = None
        try:
            if job_request.goal is not None:
                goal_plan = await run_in_threadpool(
                    goal_planner_of(request.app).plan, job_request.goal, nodes=nodes or []
                )
                plan = goal_plan.plan
            else:
                plan = request.app.state.planner.plan(job_request, nodes)
        except PlanError as exc:
            return _error(422, "invalid_plan", exc.problems)
        except GoalPlanError as exc:
            body = {
                "error": "plan_rejected",
                "detail": [{"field": f, "reason": r} for f, r in exc.problems],
                "model": exc.model,
                "model_answer": exc.answer,
            }
            return JSONResponse(status_code=422, content=body)
        except NoModelAvailable as exc:
            return _error(503, "no_model", [("goal", str(exc))])
        if job_request.dry_run:
            preview = PlanPreview(
                steps=goal_plan.steps if goal_plan else _steps_from_plan(plan),
                subtasks=plan.subtasks,
                model=goal_plan.model if goal_plan else None,
                fell_back_from=goal_plan.fell_back_from if goal_plan else [],
                repaired=goal_plan.repaired if goal_plan else False,
            )
            return JSONResponse(status_code=200, content=preview.model_dump(mode="json"))
        result = store.create_job(
            job_id=uuid.uuid4().hex,
            tenant=principal.tenant,
            priority=job_request.priority,
            name=job_request.name,
            callback_url=str(job_request.callback_url) if job_request.callback_url else None,
            plan=plan,
            request_json=json.dumps(job_request.model_dump(mode="json")),
            request_hash=digest,
            idempotency_key=idempotency_key,
            deadline_s=job_request.deadline_s,
        )
        if not result.created and result.request_hash != digest:
            return _error(
                422,
                "idempotency_conflict",
                [("Idempotency-Key", "already used for a different request body")],
            )
        if result.created:
            request.app.state.metrics.submitted.labels(priority=job_request.priority.value).inc()
            # Release right away rather than waiting for the release loop's next turn.
            classes = {st.resource_class for st in plan.subtasks if not st.needs}
            for resource_class in classes:
                request.app.state.dispatcher.release(resource_class)
        status = store.get_job(result.job_id)
        assert status is not None
        return JSONResponse(
            status_code=201 if result.created else 200,
            content=status.model_dump(mode="json"),
            headers={"Location": f"/v1/jobs/{result.job_id}"},
        )

    @app.get("/v1/jobs", tags=["jobs"], response_model=JobPage)
    def list_jobs(
        request: Request,
        principal: ReadPrincipal,
        state: JobState | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[
            str | None, Query(pattern=r"^\d{1,12}(\.\d{1,9})?_[0-9a-f]{32}$", description="next_cursor of the previous page")
        ] = None,
    ) -> JobPage:
        store: JobStore = request.app.state.store
        tenant = None if principal.is_admin else principal.tenant
        return store.list_jobs(tenant=tenant, state=state, limit=limit, cursor=cursor)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], response_model=JobStatus)
    def get_job(request: Request, job_id: str, principal: ReadPrincipal) -> JobStatus:
        return _visible_job(request, principal, job_id)

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"], response_model=JobStatus, status_code=202)
    def cancel_job(request: Request, job_id: str, principal: SubmitPrincipal) -> JobStatus:
        current = _visible_job(request, principal, job_id)
        if current.state in (JobState.succeeded, JobState.failed):
            raise HTTPException(
                409, detail=[{"field": "job_id", "reason": f"job already {current.state.value}; nothing to cancel"}]
            )
        request.app.state.store.cancel_job(job_id)
        return _visible_job(request, principal, job_id)

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_class=EventSourceResponse)
    async def job_events(
        request: Request,
        job_id: str,
        principal: ReadPrincipal,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    ) -> Response:
        _visible_job(request, principal, job_id)
        if last_event_id is not None and not STREAM_ID.fullmatch(last_event_id):
            return _error(422, "invalid_request", [("Last-Event-ID", "must be an event id like '1712345678901-0'")])
        keys = request.app.state.store.keys
        stream = job_event_stream(
            request.app.state.aredis, keys.events(job_id), last_event_id or "0", keys.job(job_id)
        )
        return EventSourceResponse(stream, ping=15)

    @app.get("/v1/scheduler", tags=["fleet"])
    def scheduler(request: Request, _: ReadPrincipal) -> dict[str, Any]:
        """The release scheduler as Redis holds it: weights (see `edgefleet.priority`),
        target depth, backlog and released-but-unclaimed depth per resource class, the
        router holding the release lease, and the last changes with their reasons."""
        store: JobStore = request.app.state.store
        depths = store.target_depths(settings.target_depth)
        return {
            "router_id": request.app.state.router_id,
            "leader": store.leader(),
            "weights": store.weights(),
            "target_depth": {rc.value: n for rc, n in depths.items()},
            "backlog": {rc.value: store.backlog_size(rc) for rc in ResourceClass},
            "queued": {rc.value: store.queued_size(rc) for rc in ResourceClass},
            "loop_released": store.loop_released(),
            "last_changes": store.scheduler_changes(),
        }

    @app.put("/v1/scheduler/weights", tags=["fleet"], response_model=None, responses=_errors(400, 415))
    def set_scheduler_weights(
        request: Request, change: SchedulerWeightsChange, _: AdminPrincipal, _json: JsonBody
    ) -> dict[str, Any] | JSONResponse:
        """Change weights (admin); every waiting subtask is rescored at once. The feedback loop
        may move `interactive` again later; the other weights stay as set."""
        problems = []
        for name, value in change.weights.items():
            try:
                validate_weights({name: value})
            except ValueError as exc:
                problems.append((f"weights.{name}", str(exc)))
        if problems:
            return _error(422, "invalid_request", problems)
        store: JobStore = request.app.state.store
        rescored = store.set_weights(change.weights, reason=change.reason)
        log.info("scheduler weights changed", extra={"changes": change.weights, "reason": change.reason})
        return {"weights": store.weights(), "rescored": rescored}

    @app.post("/v1/admin/gc", tags=["admin"], response_model=GcResult, responses=_errors(400, 415))
    def collect_garbage(
        request: Request, _: AdminPrincipal, _json: JsonBody, body: GcRequest | None = None
    ) -> GcResult:
        """Delete finished jobs (their subtasks, events, idempotency keys) now (admin), at most
        `limit` per call; call again while `remaining` > 0. The router also does this every
        `EDGEFLEET_GC_INTERVAL` seconds for jobs older than `EDGEFLEET_JOB_RETENTION`."""
        body = body or GcRequest()
        store: JobStore = request.app.state.store
        older_than = settings.job_retention if body.older_than is None else body.older_than
        batch = store.gc(older_than=older_than, limit=body.limit)
        if batch.removed:
            log.info("expired finished jobs on request", extra={"count": len(batch.removed), "older_than": older_than})
        return GcResult(removed=batch.removed, remaining=batch.remaining, older_than=older_than)

    @app.get("/v1/workers", tags=["fleet"], response_model=list[NodeInfo])
    def workers(request: Request, _: ReadPrincipal) -> list[NodeInfo]:
        return request.app.state.store.live_nodes()

    @app.get("/v1/plugins", tags=["fleet"])
    def plugins(request: Request, _: ReadPrincipal) -> dict[str, Any]:
        """The plugin catalogue: each plugin's manifest and the live nodes that can run it.

        `nodes`: live nodes that serve the plugin's resource class and advertise it
        (its dependencies are met there); `advertised_by`: every live node that
        advertises it, whatever its classes (a step may override its class).
        `errors`: the rejected manifests, each with file, field and reason.
        """
        catalog: PluginCatalog = request.app.state.plugins
        nodes = request.app.state.store.live_nodes()
        described = catalog.describe()
        for entry in described:
            advertising = [n for n in nodes if entry["name"] in n.plugins]
            entry["advertised_by"] = [n.name for n in advertising]
            entry["nodes"] = [n.name for n in advertising if entry["resource_class"] in {c.value for c in n.classes}]
        return {
            "plugins": described,
            "errors": catalog.describe_errors(),
            "templates": request.app.state.templates.describe(),
        }
