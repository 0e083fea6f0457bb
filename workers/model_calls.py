"""Answers a sandboxed plugin's ctx.model(...) calls with this worker process's warm models.

The plugin never sees an API key or a model file, only the answer; the model
router validates the request, which comes from untrusted code.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from edgefleet.models.router import ModelRouter


class ModelCallHandler:
    """One per worker process; its model router is built on the first call, not at start."""

    def __init__(self, build_router: Callable[[], ModelRouter], on_warm: Callable[[list[str]], None]) -> None:
        self._build_router = build_router
        self._on_warm = on_warm
        self._router: ModelRouter | None = None
        self._lock = threading.Lock()

    @property
    def router(self) -> ModelRouter:
        with self._lock:
            if self._router is None:
                self._router = self._build_router()
            return self._router

    def __call__(self, request: dict[str, Any], *, time_left: float | None = None) -> dict[str, Any]:
        reply = self.router.handle_call(request, timeout=time_left)
        # Tell the fleet which models are warm here, for model affinity at release.
        self._on_warm(self.router.pool.loaded())
        return reply
