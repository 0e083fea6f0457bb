"""One place that builds a process's model router, so that pool and router share one config."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from edgefleet.models.config import ModelsConfig, load_models_config
from edgefleet.models.metrics import ModelMetrics
from edgefleet.models.router import ModelRouter
from edgefleet.models.runtime import ModelPool
from edgefleet.settings import Settings


def build_model_router(
    settings: Settings, registry: CollectorRegistry | None = None, config: ModelsConfig | None = None
) -> ModelRouter:
    """Call once per process (metrics register once); nothing is loaded until the first call.

    `config`: the registry already read (e.g. at start-up); default: read it from `settings` now.
    """
    config = config if config is not None else load_models_config(settings)
    return ModelRouter(config, ModelPool(config, settings), ModelMetrics(registry))
