"""The router's goal planner, built on first use: a router that never plans a goal loads no model.

The model registry itself is read when the router starts: a missing or invalid
`EDGEFLEET_MODELS_FILE` stops the start-up with a message naming the file and the field,
rather than failing the first goal with a 500.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry

from edgefleet.models.config import ModelsConfig, load_models_config
from edgefleet.models.factory import build_model_router
from edgefleet.plugin_catalog import PluginCatalog
from edgefleet.router.goal_planner import GoalPlanner
from edgefleet.router.planner import Planner
from edgefleet.settings import Settings


class LazyGoalPlanner:
    def __init__(
        self, settings: Settings, registry: CollectorRegistry, planner: Planner, plugins: PluginCatalog
    ) -> None:
        """Raises `ModelsConfigError` (naming the file) when the models file cannot be read or is invalid."""
        self._settings = settings
        self._registry = registry
        self._planner = planner
        self._plugins = plugins
        self._config: ModelsConfig = load_models_config(settings)
        self._lock = threading.Lock()
        self._built: GoalPlanner | None = None

    def get(self) -> GoalPlanner:
        # Locked: the model router's metrics register once per registry.
        with self._lock:
            if self._built is None:
                models = build_model_router(self._settings, registry=self._registry, config=self._config)
                self._built = GoalPlanner(self._planner, self._plugins, models)
            return self._built
