"""The router's model router, built on first use: a router that never plans a goal loads no model."""

from __future__ import annotations

import threading

from fastapi import FastAPI

from edgefleet.models.factory import build_model_router
from router.goal_planner import GoalPlanner

_lock = threading.Lock()


def goal_planner_of(app: FastAPI) -> GoalPlanner:
    with _lock:
        planner = getattr(app.state, "goal_planner", None)
        if planner is None:
            models = build_model_router(app.state.settings, registry=app.state.metrics.registry)
            planner = GoalPlanner(app.state.planner, app.state.plugins, models)
            app.state.goal_planner = planner
        return planner
