"""`ModelRouter`: per task type, try the route's primary, then its fallbacks.

A model is passed over (and the reason recorded on the returned `Completion`) when
it errors, times out, cannot be reached, is missing, is misconfigured, has its
circuit open, or has spent its token budget for the rolling hour.

Circuit breaker, per model: `circuit.failures` consecutive failed calls (error,
connection, timeout) open it; while open the model is not called at all; after
`circuit.reset_after` seconds it is half-open and one trial call goes through:
success closes it, failure opens it again for another `reset_after`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from edgefleet.models.backends import Completion, Message, validate_messages
from edgefleet.models.config import ModelsConfig
from edgefleet.models.errors import (
    REASON_CIRCUIT_OPEN,
    REASON_CONNECTION,
    REASON_ERROR,
    REASON_NO_ROUTE,
    REASON_TIMEOUT,
    REASON_TOKEN_BUDGET,
    Attempt,
    ModelError,
    NoModelAvailable,
)
from edgefleet.models.metrics import ModelMetrics
from edgefleet.models.runtime import ModelPool

log = logging.getLogger(__name__)

CircuitState = Literal["closed", "open", "half_open"]
BUDGET_WINDOW_S = 3600.0
# Reasons that count as a failure of the model itself (and so toward opening its circuit).
CIRCUIT_REASONS = frozenset({REASON_ERROR, REASON_CONNECTION, REASON_TIMEOUT})


@dataclass
class _Circuit:
    failures: int = 0
    opened_at: float | None = None
    trial_in_flight: bool = False


@dataclass
class _Budget:
    used: deque[tuple[float, int]] = field(default_factory=deque)

    def spent(self, now: float) -> int:
        while self.used and self.used[0][0] <= now - BUDGET_WINDOW_S:
            self.used.popleft()
        return sum(tokens for _, tokens in self.used)


class ModelRouter:
    """Routes model calls by task type over the models of a `ModelPool`. Thread-safe."""

    def __init__(
        self,
        config: ModelsConfig,
        pool: ModelPool,
        metrics: ModelMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.pool = pool
        self.metrics = metrics
        self.clock = clock
        self._lock = threading.Lock()
        self._circuits: dict[str, _Circuit] = {}
        self._budgets: dict[str, _Budget] = {}

    # -- circuit breaker ----------------------------------------------------------------

    def circuit_state(self, model: str) -> CircuitState:
        with self._lock:
            return self._state(model, self.clock())

    def _state(self, model: str, now: float) -> CircuitState:
        circuit = self._circuits.get(model)
        if circuit is None or circuit.opened_at is None:
            return "closed"
        if now - circuit.opened_at >= self.config.circuit.reset_after:
            return "half_open"
        return "open"

    def _admit(self, model: str) -> str | None:
        """None if `model` may be called now, else the reason it is skipped."""
        now = self.clock()
        with self._lock:
            state = self._state(model, now)
            if state == "open":
                return REASON_CIRCUIT_OPEN
            if state == "half_open":
                circuit = self._circuits[model]
                if circuit.trial_in_flight:
                    return REASON_CIRCUIT_OPEN  # one trial at a time
                circuit.trial_in_flight = True
            budget = self.config.token_budget.get(model)
            if budget is not None and self._budgets.setdefault(model, _Budget()).spent(now) >= budget:
                if state == "half_open":
                    self._circuits[model].trial_in_flight = False
                return REASON_TOKEN_BUDGET
        return None

    def _record_success(self, model: str, tokens: int) -> None:
        with self._lock:
            self._circuits.pop(model, None)
            if model in self.config.token_budget:
                self._budgets.setdefault(model, _Budget()).used.append((self.clock(), tokens))

    def _record_failure(self, model: str, reason: str) -> None:
        with self._lock:
            circuit = self._circuits.setdefault(model, _Circuit())
            was_trial = circuit.trial_in_flight
            circuit.trial_in_flight = False
            if reason not in CIRCUIT_REASONS:
                return
            circuit.failures += 1
            if was_trial or circuit.failures >= self.config.circuit.failures:
                if circuit.opened_at is None or was_trial:
                    log.warning("circuit opened", extra={"model": model, "failures": circuit.failures})
                circuit.opened_at = self.clock()

    def _release_trial(self, model: str) -> None:
        with self._lock:
            circuit = self._circuits.get(model)
            if circuit is not None:
                circuit.trial_in_flight = False

    def tokens_spent(self, model: str) -> int:
        """Tokens (in + out) `model` used in the last hour through this router."""
        with self._lock:
            budget = self._budgets.get(model)
            return budget.spent(self.clock()) if budget else 0

    def route(self, task_type: str) -> list[str]:
        """The models tried for `task_type`, in order ([] when it has no route)."""
        spec = self.config.route(task_type)
        return spec.chain() if spec else []

    def complete(
        self,
        task_type: str,
        messages: Sequence[Message],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        json_schema: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Completion:
        """Answer with the first model on the route that can; raise `NoModelAvailable` if none can.

        `timeout` (seconds) applies to each model tried; default: each model's own `timeout`.
        Malformed `messages` raise `ValueError` before any model is tried.
        """
        messages = validate_messages(messages)  # a bad request is the caller's error, never a fallback
        route = self.config.route(task_type)
        chain = route.chain() if route else []
        if not chain:
            raise NoModelAvailable(task_type, [Attempt("", REASON_NO_ROUTE, f"task type {task_type!r} has no route")])
        attempts: list[Attempt] = []
        for model in chain:
            skipped = self._admit(model)
            if skipped is not None:
                attempt = Attempt(model, skipped)
                attempts.append(attempt)
                if self.metrics:
                    self.metrics.observe_failure(task_type, attempt, called=False)
                continue
            try:
                completion = self.pool.complete(
                    model,
                    messages,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    json_schema=json_schema,
                    timeout=timeout,
                    extra_body=route.extra_body if route else None,
                )
            except ModelError as exc:
                self._record_failure(model, exc.reason)
                attempt = Attempt(model, exc.reason, exc.detail)
                attempts.append(attempt)
                log.warning(
                    "model call failed, trying the next one",
                    extra={"model": model, "task_type": task_type, "reason": exc.reason, "detail": exc.detail},
                )
                if self.metrics:
                    self.metrics.observe_failure(task_type, attempt, called=True)
                continue
            except BaseException:
                self._release_trial(model)
                raise
            self._record_success(model, completion.tokens_in + completion.tokens_out)
            completion.task_type = task_type
            completion.fallbacks = attempts
            if self.metrics:
                self.metrics.observe_completion(task_type, completion)
            return completion
        raise NoModelAvailable(task_type, attempts)

    def handle_call(self, request: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """Serve one JSON request from a sandboxed plugin (`edgefleet.plugin_context.ModelCall`).

        `request`: {task_type, messages, max_tokens?, temperature?, json_schema?, timeout?}.
        Returns {"ok": true, "completion": {...Completion.to_dict(), "fell_back_from": [[model, reason]]}}
        or {"ok": false, "error": "...", "attempts": [...]}; never raises for a bad request or no model.
        `timeout` (e.g. the subtask's time left) caps the request's own timeout.
        """
        try:
            task_type = request.get("task_type")
            if not isinstance(task_type, str) or not task_type:
                raise ValueError("task_type must be a non-empty string")
            limit = request.get("timeout")
            if limit is not None and not isinstance(limit, (int, float)):
                raise ValueError("timeout must be a number of seconds")
            if timeout is not None:
                limit = timeout if limit is None else min(float(limit), timeout)
            schema = request.get("json_schema")
            if schema is not None and not isinstance(schema, Mapping):
                raise ValueError("json_schema must be an object")
            completion = self.complete(
                task_type,
                request.get("messages") or [],
                max_tokens=int(request.get("max_tokens") or 256),
                temperature=float(request.get("temperature") or 0.0),
                json_schema=schema,
                timeout=limit,
            )
        except NoModelAvailable as exc:
            return {"ok": False, "error": str(exc), "attempts": [a.to_dict() for a in exc.attempts]}
        except (ValueError, TypeError) as exc:
            return {"ok": False, "error": f"bad model request: {exc}", "attempts": []}
        data = completion.to_dict()
        data["fell_back_from"] = [[a.model, a.reason] for a in completion.fallbacks]
        return {"ok": True, "completion": data}
