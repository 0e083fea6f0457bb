"""Sends a subtask that needs a model to a box that has that model warm.

A plugin action declares the model task it uses (`model_task` in its manifest);
the models config routes that task to a primary model; nodes advertise the
models warm in their worker processes. A match goes to that node's direct
queue, anything else to the class queue.
"""

from __future__ import annotations

import logging
import threading
import time

from edgefleet.celery_app import node_queue
from edgefleet.models.config import ModelsConfig
from edgefleet.plugin_catalog import PluginCatalog
from edgefleet.schemas import NodeInfo, SubtaskEnvelope
from edgefleet.settings import Settings
from edgefleet.store import JobStore
from edgefleet.store.nodes import NodeStore

log = logging.getLogger(__name__)

NODES_REFRESH_SECONDS = 1.0


class ModelAffinity:
    def __init__(self, nodes: NodeStore, catalog: PluginCatalog, config: ModelsConfig) -> None:
        self.nodes = nodes
        self.catalog = catalog
        self.config = config
        self._lock = threading.Lock()
        self._nodes: list[NodeInfo] = []
        self._fetched = 0.0
        self._turn = 0

    def wanted_model(self, env: SubtaskEnvelope) -> str | None:
        plugin = self.catalog.get(env.plugin)
        action = plugin.manifest.actions.get(env.action) if plugin else None
        if action is None or not action.model_task:
            return None
        route = self.config.route(action.model_task)
        return route.primary if route else None

    def _live_nodes(self) -> list[NodeInfo]:
        with self._lock:
            if time.monotonic() - self._fetched > NODES_REFRESH_SECONDS:
                self._nodes = self.nodes.live_nodes()
                self._fetched = time.monotonic()
            return self._nodes

    def queue_for(self, env: SubtaskEnvelope) -> str | None:
        """The direct queue of a node with the subtask's model warm, or None for the class queue."""
        model = self.wanted_model(env)
        if model is None:
            return None
        warm = [
            node
            for node in self._live_nodes()
            if model in node.models_loaded and env.resource_class in node.classes and env.plugin in node.plugins
        ]
        if not warm:
            return None
        with self._lock:
            self._turn += 1
            node = warm[self._turn % len(warm)]
        return f"{node_queue(node.name)}.{env.resource_class.value}"


def build_affinity(store: JobStore, catalog: PluginCatalog, settings: Settings) -> ModelAffinity | None:
    """Affinity from the models config; a broken config is logged and routes by class only."""
    from edgefleet.models.config import load_models_config
    from edgefleet.models.errors import ModelsConfigError

    try:
        config = load_models_config(settings)
    except (ModelsConfigError, OSError) as exc:
        log.error("models config not loaded; no model affinity", extra={"error": str(exc)})
        return None
    return ModelAffinity(store.nodes, catalog, config) if config.routes else None
