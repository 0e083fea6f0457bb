"""Prometheus metrics of the model layer, per model.

Histograms and counters only (no gauges), so that they sum correctly across
prefork children in prometheus-client's multiprocess mode.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from edgefleet.models.backends import Completion
from edgefleet.models.errors import Attempt

MODEL_CALLS = "edgefleet_model_calls_total"
MODEL_FALLBACKS = "edgefleet_model_fallbacks_total"
MODEL_LATENCY = "edgefleet_model_latency_seconds"
MODEL_FIRST_TOKEN = "edgefleet_model_first_token_seconds"
MODEL_TOKENS_IN = "edgefleet_model_tokens_in_total"
MODEL_TOKENS_OUT = "edgefleet_model_tokens_out_total"
MODEL_TOKENS_PER_SECOND = "edgefleet_model_tokens_per_second"
MODEL_LOAD_SECONDS = "edgefleet_model_load_seconds"

OUTCOME_OK = "ok"

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TPS_BUCKETS = (1, 2, 5, 10, 20, 40, 80, 160, 320, 640, 1280)
_LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 60)


class ModelMetrics:
    """The model metrics, on `registry` (prometheus-client's default registry when None)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # prometheus-client's own default when none is given, without a **kwargs mypy cannot check.
        registry = registry if registry is not None else REGISTRY
        self.calls = Counter(
            MODEL_CALLS,
            "model calls attempted, by outcome (ok or the fallback reason)",
            ["model", "task_type", "outcome"],
            registry=registry,
        )
        self.fallbacks = Counter(
            MODEL_FALLBACKS,
            "times the router moved past a model, by reason",
            ["model", "reason"],
            registry=registry,
        )
        self.latency = Histogram(
            MODEL_LATENCY, "wall time of successful model calls", ["model"], buckets=_LATENCY_BUCKETS, registry=registry
        )
        self.first_token = Histogram(
            MODEL_FIRST_TOKEN,
            "time to the first streamed token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens_in = Counter(MODEL_TOKENS_IN, "prompt tokens", ["model"], registry=registry)
        self.tokens_out = Counter(MODEL_TOKENS_OUT, "generated tokens", ["model"], registry=registry)
        self.tokens_per_second = Histogram(
            MODEL_TOKENS_PER_SECOND, "decode speed of model calls", ["model"], buckets=_TPS_BUCKETS, registry=registry
        )
        self.load_seconds = Histogram(
            MODEL_LOAD_SECONDS, "time to load a model", ["model"], buckets=_LOAD_BUCKETS, registry=registry
        )

    def observe_completion(self, task_type: str, completion: Completion) -> None:
        model = completion.model
        self.calls.labels(model, task_type, OUTCOME_OK).inc()
        self.latency.labels(model).observe(completion.seconds)
        if completion.first_token_seconds is not None:
            self.first_token.labels(model).observe(completion.first_token_seconds)
        self.tokens_in.labels(model).inc(completion.tokens_in)
        self.tokens_out.labels(model).inc(completion.tokens_out)
        if completion.tokens_out:
            self.tokens_per_second.labels(model).observe(completion.tokens_per_second)
        if completion.load_seconds > 0:
            self.load_seconds.labels(model).observe(completion.load_seconds)

    def observe_failure(self, task_type: str, attempt: Attempt, *, called: bool) -> None:
        """A model passed over. `called`: a call was made (counted in calls) rather than skipped."""
        if called:
            self.calls.labels(attempt.model, task_type, attempt.reason).inc()
        self.fallbacks.labels(attempt.model, attempt.reason).inc()
