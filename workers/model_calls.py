"""Answers a sandboxed plugin's ctx.model(...) calls with this worker process's warm models.

The plugin never sees an API key or a model file, only the answer; the model
router validates the request, which comes from untrusted code.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from edgefleet.models.router import ModelRouter

WARM_REFRESH_SECONDS = 60.0


class ModelCallHandler:
    """One per worker process; its model router is built on the first call, not at start."""

    def __init__(self, build_router: Callable[[], ModelRouter], on_warm: Callable[[list[str]], None]) -> None:
        self._build_router = build_router
        self._on_warm = on_warm
        self._router: ModelRouter | None = None
        self._lock = threading.Lock()
        self._advertised: list[str] = []
        self._advertised_at = 0.0

    @property
    def router(self) -> ModelRouter:
        with self._lock:
            if self._router is None:
                self._router = self._build_router()
            return self._router

    def __call__(self, request: dict[str, Any], *, time_left: float | None = None) -> dict[str, Any]:
        reply = self.router.handle_call(request, timeout=time_left)
        # Tell the fleet which models are warm here, for model affinity at release: when the
        # set changed, else once a minute to keep the advertisement alive.
        warm = self.router.pool.loaded()
        now = time.monotonic()
        if warm != self._advertised or now - self._advertised_at > WARM_REFRESH_SECONDS:
            self._on_warm(warm)
            self._advertised, self._advertised_at = warm, now
        return reply
