"""One place that builds a process's model router, so that pool and router share one config."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from edgefleet.models.config import load_models_config
from edgefleet.models.metrics import ModelMetrics
from edgefleet.models.router import ModelRouter
from edgefleet.models.runtime import ModelPool
from edgefleet.settings import Settings


def build_model_router(settings: Settings, registry: CollectorRegistry | None = None) -> ModelRouter:
    """Call once per process (metrics register once); nothing is loaded until the first call."""
    config = load_models_config(settings)
    return ModelRouter(config, ModelPool(config, settings), ModelMetrics(registry))
