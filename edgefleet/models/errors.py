"""Errors of the model layer. Each backend error carries the fallback `reason` the router records."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from edgefleet.plugin_context import ModelUnavailable

# The reasons a router records when it moves past a model (`Completion.fallbacks`).
REASON_ERROR = "error"  # the backend raised or answered an HTTP error
REASON_CONNECTION = "connection"  # an OpenAI-compatible endpoint could not be reached
REASON_TIMEOUT = "timeout"  # no answer within the timeout (or the model stayed busy that long)
REASON_MISSING = "missing model"  # unknown name, GGUF file missing, or backend package not installed
REASON_CONFIG = "config"  # the model is misconfigured here (e.g. its api_key_env is not set)
REASON_CIRCUIT_OPEN = "circuit open"  # too many consecutive failures; not tried
REASON_TOKEN_BUDGET = "token budget"  # its tokens-per-hour budget is spent; not tried
REASON_NO_ROUTE = "no route"  # the task type has no route
# The request does not fit the model's context window: the caller's prompt is too long for this
# model, not a failure of the model, so it never counts toward its circuit breaker.
REASON_CONTEXT = "context overflow"

REASONS = (
    REASON_ERROR,
    REASON_CONNECTION,
    REASON_TIMEOUT,
    REASON_MISSING,
    REASON_CONFIG,
    REASON_CIRCUIT_OPEN,
    REASON_TOKEN_BUDGET,
    REASON_NO_ROUTE,
    REASON_CONTEXT,
)


class ModelsConfigError(ValueError):
    """The model registry (models.yaml or the built-in default) is invalid.

    `errors` holds one line per problem, each starting with the field's dotted path,
    e.g. ``routes.summarize.primary: unknown model 'x'``. Input values are never echoed.
    """

    def __init__(self, errors: Sequence[str], source: str | None = None) -> None:
        self.errors = list(errors)
        self.source = source
        head = f"invalid model config{f' in {source}' if source else ''}"
        super().__init__(head + ": " + "; ".join(self.errors))


class ModelError(RuntimeError):
    """A model could not serve one call. `reason` is what the router records."""

    reason: str = REASON_ERROR

    def __init__(self, model: str, detail: str) -> None:
        super().__init__(f"model {model!r}: {detail}")
        self.model = model
        self.detail = detail


class ModelCallError(ModelError):
    reason = REASON_ERROR


class ModelConnectionError(ModelError):
    reason = REASON_CONNECTION


class ModelTimeout(ModelError):
    reason = REASON_TIMEOUT


class ModelMissing(ModelError):
    reason = REASON_MISSING


class ModelConfigError(ModelError):
    reason = REASON_CONFIG


class ModelContextOverflow(ModelError):
    reason = REASON_CONTEXT


@dataclass(frozen=True, eq=False)
class Attempt:
    """One model the router moved past. Unpacks and compares as ``(model, reason)``; `detail` says more."""

    model: str
    reason: str
    detail: str = ""

    def __iter__(self) -> Iterator[str]:
        return iter((self.model, self.reason))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Attempt):
            return (self.model, self.reason, self.detail) == (other.model, other.reason, other.detail)
        if isinstance(other, tuple):
            return (self.model, self.reason) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.model, self.reason))

    def __repr__(self) -> str:
        return f"Attempt({self.model!r}, {self.reason!r}, {self.detail!r})"

    def to_dict(self) -> dict[str, str]:
        return {"model": self.model, "reason": self.reason, "detail": self.detail}


class NoModelAvailable(ModelUnavailable):
    """Every model on the task type's route failed or was skipped (or there is no route)."""

    def __init__(self, task_type: str, attempts: Sequence[Attempt]) -> None:
        self.task_type = task_type
        self.attempts = list(attempts)
        if self.attempts:
            tried = "; ".join(f"{a.model}: {a.reason}" + (f" ({a.detail})" if a.detail else "") for a in self.attempts)
        else:
            tried = "nothing tried"
        super().__init__(f"no model available for task type {task_type!r}: {tried}")
