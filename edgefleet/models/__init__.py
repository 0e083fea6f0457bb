"""The model layer: registry (`config`), backends, per-process pool (`runtime`), router, metrics.

Nothing here loads a model or imports llama_cpp/openai at import time.
"""

from edgefleet.models.backends import Completion, LlamaCppBackend, OpenAIBackend, make_backend
from edgefleet.models.config import (
    CircuitSpec,
    ModelsConfig,
    ModelSpec,
    RouteSpec,
    default_models_config,
    load_models_config,
    load_models_file,
)
from edgefleet.models.errors import (
    Attempt,
    ModelCallError,
    ModelConfigError,
    ModelConnectionError,
    ModelContextOverflow,
    ModelError,
    ModelMissing,
    ModelsConfigError,
    ModelTimeout,
    NoModelAvailable,
)
from edgefleet.models.metrics import ModelMetrics
from edgefleet.models.router import ModelRouter
from edgefleet.models.runtime import ModelPool

__all__ = [
    "Attempt",
    "CircuitSpec",
    "Completion",
    "LlamaCppBackend",
    "ModelCallError",
    "ModelConfigError",
    "ModelConnectionError",
    "ModelContextOverflow",
    "ModelError",
    "ModelMetrics",
    "ModelMissing",
    "ModelPool",
    "ModelRouter",
    "ModelSpec",
    "ModelTimeout",
    "ModelsConfig",
    "ModelsConfigError",
    "NoModelAvailable",
    "OpenAIBackend",
    "RouteSpec",
    "default_models_config",
    "load_models_config",
    "load_models_file",
    "make_backend",
]
