"""`ModelPool`: the models of one worker process, loaded lazily, kept warm, bounded by memory.

One lock per model: two calls to one llama_cpp model run one after the other
(a `llama_cpp.Llama` is not thread-safe); calls to different models run in
parallel. llama_cpp models are unloaded least-recently-used first to keep the
sum of their sizes under the memory budget; a model that is in use is never
unloaded. openai models cost no memory and are never evicted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from edgefleet.models.backends import Backend, Completion, Message, make_backend
from edgefleet.models.config import ModelsConfig, ModelSpec
from edgefleet.models.errors import ModelMissing, ModelTimeout

if TYPE_CHECKING:
    from edgefleet.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MEMORY_MB = 4096


class ModelPool:
    """Warm backends by model name for one process."""

    def __init__(
        self,
        config: ModelsConfig,
        settings: Settings | None = None,
        *,
        memory_budget_bytes: int | None = None,
    ) -> None:
        """The budget is `memory_budget_bytes`, else `settings.model_memory_mb`, else 4096 MB."""
        self.config = config
        if memory_budget_bytes is None:
            mb = getattr(settings, "model_memory_mb", None) or DEFAULT_MEMORY_MB
            memory_budget_bytes = int(float(mb) * 1024 * 1024)
        self.memory_budget_bytes = int(memory_budget_bytes)
        self._lock = threading.Lock()  # guards the dicts below; never held while loading or generating
        self._model_locks: dict[str, threading.Lock] = {}
        self._backends: OrderedDict[str, Backend] = OrderedDict()  # LRU order: oldest first

    def __repr__(self) -> str:
        return f"ModelPool(loaded={self.loaded()}, budget={self.memory_budget_bytes} bytes)"

    # -- what is here -------------------------------------------------------------------

    def spec(self, name: str) -> ModelSpec:
        try:
            return self.config.models[name]
        except KeyError:
            raise ModelMissing(name, "no such model in the registry") from None

    def loaded(self) -> list[str]:
        """Models loaded (warm) now, least recently used first."""
        with self._lock:
            return [name for name, backend in self._backends.items() if backend.loaded]

    def available(self) -> list[str]:
        """Models this process could serve: llama_cpp ones whose file exists, every openai one."""
        return sorted(
            name for name, spec in self.config.models.items() if spec.backend == "openai" or spec.file_exists()
        )

    def memory_used(self) -> int:
        """Bytes of the loaded llama_cpp models (about their file sizes)."""
        with self._lock:
            return sum(b.memory_bytes() for b in self._backends.values() if b.loaded)

    # -- loading and eviction -----------------------------------------------------------

    def _model_lock(self, name: str) -> threading.Lock:
        with self._lock:
            lock = self._model_locks.get(name)
            if lock is None:
                lock = self._model_locks[name] = threading.Lock()
            return lock

    def _backend(self, name: str) -> Backend:
        spec = self.spec(name)
        with self._lock:
            backend = self._backends.get(name)
        if backend is None:
            backend = make_backend(spec)  # may raise ModelConfigError (e.g. api key env var missing)
            with self._lock:
                backend = self._backends.setdefault(name, backend)
        return backend

    def _make_room(self, name: str, needed: int) -> None:
        """Unload least-recently-used idle llama_cpp models until `needed` more bytes fit."""
        with self._lock:
            candidates = [n for n, b in self._backends.items() if n != name and b.loaded and b.memory_bytes() > 0]
        for victim in candidates:
            if self.memory_used() + needed <= self.memory_budget_bytes:
                return
            lock = self._model_locks.get(victim)
            if lock is None or not lock.acquire(blocking=False):
                continue  # in use right now: never pulled out from under a call
            try:
                with self._lock:
                    backend = self._backends.get(victim)
                if backend is not None and backend.loaded:
                    backend.close()
                    log.info("model unloaded to stay under the memory budget", extra={"model": victim})
            finally:
                lock.release()
        if self.memory_used() + needed > self.memory_budget_bytes:
            log.warning(
                "model %s (%d bytes) exceeds the memory budget (%d bytes) with what is in use; loading anyway",
                name,
                needed,
                self.memory_budget_bytes,
            )

    def _ensure_loaded(self, name: str, backend: Backend) -> float:
        """Called with the model's lock held. Returns the seconds spent loading (0.0 when warm)."""
        if backend.loaded:
            with self._lock:
                self._backends.move_to_end(name)
            return 0.0
        size = backend.memory_bytes()
        if size:
            self._make_room(name, size)
        seconds = backend.load()
        with self._lock:
            self._backends[name] = backend
            self._backends.move_to_end(name)
        return seconds

    @contextmanager
    def lease(self, name: str, *, timeout: float | None = None) -> Iterator[tuple[Backend, float]]:
        """Hold model `name` (loaded) exclusively: yields ``(backend, load_seconds)``.

        Waits at most `timeout` seconds for another call on the same model (then `ModelTimeout`).
        """
        backend = self._backend(name)
        lock = self._model_lock(name)
        if not lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            raise ModelTimeout(name, f"busy with another call for more than {timeout:g}s")
        try:
            yield backend, self._ensure_loaded(name, backend)
        finally:
            lock.release()

    def load(self, name: str) -> float:
        """Load `name` now (e.g. to warm a node at start); returns the seconds it took (0.0 if warm)."""
        with self.lease(name) as (_, seconds):
            return seconds

    def complete(
        self,
        name: str,
        messages: Sequence[Message],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        json_schema: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> Completion:
        """One call on model `name`, loading it first if needed (its `load_seconds` says how long)."""
        timeout = self.spec(name).timeout if timeout is None else timeout
        waited = time.monotonic()
        with self.lease(name, timeout=timeout) as (backend, load_seconds):
            remaining = max(0.001, timeout - (time.monotonic() - waited) + load_seconds)
            completion = backend.complete(
                messages,
                max_tokens=max_tokens,
                temperature=temperature,
                json_schema=json_schema,
                timeout=remaining,
                extra_body=extra_body,
            )
        completion.load_seconds = load_seconds
        return completion

    def unload(self, name: str) -> bool:
        """Unload `name` if loaded (waits for a call on it to finish). True if it was loaded."""
        with self._lock:
            backend = self._backends.get(name)
        if backend is None or not backend.loaded:
            return False
        with self._model_lock(name):
            backend.close()
        return True

    def close(self) -> None:
        """Unload every model."""
        with self._lock:
            names = list(self._backends)
        for name in names:
            self.unload(name)
