"""The router's HTTP API (FastAPI). `create_app` wires the parts: the collaborators
(`router.services`), the error answers (`router.errors`) and one APIRouter per area
(`router.api`); handlers stay thin."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from edgefleet import __version__
from edgefleet.router.api import artifacts, discovery, fleet, goals, jobs, join, ops, schedules, webhooks
from edgefleet.router.errors import error_responses, install_error_handlers
from edgefleet.router.openapi import install_openapi
from edgefleet.router.services import RouterServices
from edgefleet.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = RouterServices.build(settings)
        app.state.services = services
        services.start(app)
        try:
            yield
        finally:
            await services.close()

    app = FastAPI(
        title="edgefleet router",
        version=__version__,
        description="Submit jobs, watch them run across the fleet.",
        lifespan=lifespan,
        # Every route may answer these, in the error shape (this also replaces FastAPI's own 422 schema).
        responses=error_responses(401, 403, 422, 503),
    )
    install_error_handlers(app)
    goals.install_goal_answers(app)
    for area in (ops, jobs, goals, fleet, discovery, webhooks, artifacts, join, schedules):
        app.include_router(area.router)
    install_openapi(app)
    return app
