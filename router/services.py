"""The router's collaborators as one typed object, built once per process by the app's lifespan.

Routes get it with the `Services` dependency instead of reading loose `app.state` attributes,
so each route shows what it uses and a type checker sees it.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from edgefleet.celery_app import create_celery
from edgefleet.netguard import OutboundGuard
from edgefleet.plugin_catalog import PluginCatalog
from edgefleet.router.artifact_service import ArtifactService
from edgefleet.router.feedback import FeedbackLoop, start_feedback
from edgefleet.router.loops import RouterLoops
from edgefleet.router.metrics import RouterMetrics
from edgefleet.router.model_access import LazyGoalPlanner
from edgefleet.router.plan_submit import GoalSubmitter
from edgefleet.router.planner import Planner
from edgefleet.router.retention import RetentionSweeper
from edgefleet.router.schedule_firing import ScheduleFirer
from edgefleet.router.schedules import ScheduleService
from edgefleet.router.submission import Submitter
from edgefleet.router.webhooks import build_guard
from edgefleet.scheduling.affinity import build_affinity
from edgefleet.scheduling.dispatch import Dispatcher
from edgefleet.scheduling.priority import DEFAULT_WEIGHTS
from edgefleet.scheduling.state import SchedulerState
from edgefleet.settings import Settings
from edgefleet.store import JobStore
from edgefleet.store.events import JobEventReader
from edgefleet.store.schedules import ScheduleStore
from edgefleet.templates import TemplateCatalog

log = logging.getLogger(__name__)


@dataclass
class RouterServices:
    settings: Settings
    router_id: str
    store: JobStore
    scheduler: SchedulerState
    # The event streams (SSE) read Redis without holding a thread each.
    events: JobEventReader
    plugins: PluginCatalog
    templates: TemplateCatalog
    planner: Planner
    goal_planner: LazyGoalPlanner
    dispatcher: Dispatcher
    metrics: RouterMetrics
    webhook_guard: OutboundGuard
    submitter: Submitter
    loops: RouterLoops
    retention: RetentionSweeper
    artifacts: ArtifactService
    schedules: ScheduleService
    # Started last (it wraps the app's middleware), so absent until `start`.
    feedback: FeedbackLoop | None = None

    @classmethod
    def build(cls, settings: Settings) -> RouterServices:
        """Every collaborator, wired; no thread is started yet."""
        store = JobStore.from_url(settings.redis_url, settings.key_prefix, retention=settings.job_retention)
        plugins = PluginCatalog.load(settings.plugin_folders)
        for problem in plugins.errors:
            log.warning("plugin not loaded", extra={"problem": str(problem)})
        templates = TemplateCatalog.load(settings.plugin_folders)
        celery = create_celery(settings, main="edgefleet-router")
        router_id = settings.router_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        scheduler = SchedulerState.of(store)
        metrics = RouterMetrics(store, scheduler, router_id)
        dispatcher = Dispatcher(scheduler, celery, settings, build_affinity(store, plugins, settings))
        # Weights live in Redis; this router's settings only fill in what is not there yet.
        scheduler.seed_weights({**DEFAULT_WEIGHTS, **settings.scheduler_weights})
        planner = Planner(plugins, templates, settings)
        goal_planner = LazyGoalPlanner(settings, metrics.registry, planner, plugins)
        guard = build_guard(settings)
        # The goal rules (trust check, held plans) on top of the plain submitter: router/plan_submit.py.
        submitter = GoalSubmitter(
            store, planner, goal_planner, dispatcher, guard, metrics.submitted, settings.require_capable_worker
        )
        schedule_store = ScheduleStore.of(store)
        return cls(
            settings=settings,
            router_id=router_id,
            store=store,
            scheduler=scheduler,
            events=JobEventReader.from_url(settings.redis_url, settings.key_prefix),
            plugins=plugins,
            templates=templates,
            planner=planner,
            goal_planner=goal_planner,
            dispatcher=dispatcher,
            metrics=metrics,
            webhook_guard=guard,
            submitter=submitter,
            loops=RouterLoops(
                store,
                scheduler,
                dispatcher,
                settings,
                metrics.released,
                metrics.requeued,
                metrics.callbacks,
                router_id=router_id,
                schedules=ScheduleFirer(schedule_store, submitter, settings),
            ),
            retention=RetentionSweeper(store, settings.gc_interval),
            artifacts=ArtifactService(settings, store, metrics.registry),
            schedules=ScheduleService(schedule_store, submitter, settings),
        )

    def start(self, app: FastAPI) -> None:
        """Start the background loops; `app` gets the submit timer of the feedback loop."""
        self.store.nodes.advertise_router(self.settings.router_port, self.settings.router_advertise_url)
        self.loops.start()
        self.retention.start()
        loops = self.loops
        self.feedback = start_feedback(
            app, self.store, self.scheduler, self.settings, self.metrics, lambda: loops.leading
        )
        log.info("router started", extra={"plugins": self.plugins.names(), "templates": self.templates.names()})

    async def close(self) -> None:
        if self.feedback is not None:
            self.feedback.stop()
        self.retention.stop()
        self.loops.stop()
        await self.events.aclose()
        self.store.close()


def services(request: Request) -> RouterServices:
    """FastAPI dependency: the collaborators the lifespan set up."""
    found = getattr(request.app.state, "services", None)
    if not isinstance(found, RouterServices):  # only a route called outside the lifespan gets here
        raise RuntimeError("the router's services are not set up (the app's lifespan did not run)")
    return found


async def _services_dependency(request: Request) -> RouterServices:
    # async: a sync dependency costs a thread-pool hop per request (see auth.require)
    return services(request)


Services = Annotated[RouterServices, Depends(_services_dependency)]
