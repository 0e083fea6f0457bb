"""Model backends: llama.cpp in-process (`llama_cpp`) and any OpenAI-compatible API (`openai`).

Both stream, so that first-token latency is measured and a timeout can stop a
generation between tokens. `llama_cpp` and `openai` are imported only when a
backend is built, so a box without them still imports this module.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgefleet.models.config import ModelSpec
from edgefleet.models.errors import (
    Attempt,
    ModelCallError,
    ModelConfigError,
    ModelConnectionError,
    ModelContextOverflow,
    ModelError,
    ModelMissing,
    ModelTimeout,
)

log = logging.getLogger(__name__)

Message = Mapping[str, Any]  # {"role": "system" | "user" | "assistant", "content": str}
# How llama.cpp (in-process and llama_cpp.server) and OpenAI say a request exceeds the context window.
CONTEXT_OVERFLOW = re.compile(r"exceed context window|maximum context length|context_length_exceeded", re.IGNORECASE)
# One more try on a connection error, with a fresh connection pool: a server that dropped a
# pooled keep-alive connection would otherwise fail the next, unrelated call.
CONNECTION_RETRIES = 1
# Sampling settings of an `extra_body` that the in-process llama.cpp backend applies too.
LOCAL_SAMPLING_KEYS = frozenset(
    {"repeat_penalty", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty", "seed"}
)


@dataclass
class Completion:
    """One answered call. `fallbacks` lists the models the router moved past, as (model, reason)."""

    text: str
    model: str
    backend: str
    tokens_in: int
    tokens_out: int
    seconds: float
    first_token_seconds: float | None
    load_seconds: float = 0.0  # 0 when the model was already warm
    finish_reason: str | None = None
    task_type: str | None = None
    fallbacks: list[Attempt] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: output tokens over the time after the first token (whole call if unknown)."""
        span = self.seconds - (self.first_token_seconds or 0.0)
        if self.tokens_out > 1 and span > 0 and self.first_token_seconds is not None:
            return (self.tokens_out - 1) / span
        return self.tokens_out / self.seconds if self.seconds > 0 else 0.0

    def json(self) -> Any:
        """The text parsed as JSON (raises `json.JSONDecodeError` on garbage)."""
        return json.loads(self.text)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (e.g. to hand a completion from the worker to a sandboxed plugin)."""
        data = asdict(self)
        data["fallbacks"] = [a.to_dict() for a in self.fallbacks]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Completion:
        values = dict(data)
        values["fallbacks"] = [Attempt(**a) for a in values.get("fallbacks") or []]
        return cls(**values)


class Backend(Protocol):
    """What `ModelPool` needs from a backend."""

    spec: ModelSpec

    @property
    def loaded(self) -> bool: ...

    def load(self) -> float: ...

    def complete(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        json_schema: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> Completion: ...

    def memory_bytes(self) -> int: ...

    def close(self) -> None: ...


def validate_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Chat messages as plain dicts; `ValueError` naming the bad item (a caller's bug, not a model failure)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {role, content} mappings")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}] must be a mapping with a string 'content'")
        if message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}].role must be system, user or assistant")
        out.append({"role": message["role"], "content": message["content"]})
    if not out:
        raise ValueError("messages is empty")
    return out


class _Deadline:
    def __init__(self, model: str, timeout: float | None, clock: Callable[[], float]) -> None:
        self.model = model
        self.timeout = timeout
        self.clock = clock
        self.end = clock() + timeout if timeout is not None else None

    def passed(self) -> bool:
        return self.end is not None and self.clock() > self.end

    def check(self, what: str) -> None:
        if self.passed():
            raise ModelTimeout(self.model, f"no complete answer within {self.timeout:g}s ({what})")


class LocalFileBackend:
    """What the backends that run a model file on this box share: where the file is, whether it is
    there, and what it costs in memory once loaded."""

    spec: ModelSpec
    _path: Path | None

    def available(self) -> bool:
        return self._path is not None and self._path.is_file()

    def memory_bytes(self) -> int:
        """About what the model costs in memory once loaded: its file size (0 if the file is missing)."""
        try:
            return self._path.stat().st_size if self._path is not None else 0
        except OSError:
            return 0

    def _model_file(self) -> Path:
        """The file to load, or `ModelMissing` saying why there is none."""
        if self._path is None:
            raise ModelMissing(self.spec.name, f"{self.spec.path}: the package that should hold it is not installed")
        if not self._path.is_file():
            raise ModelMissing(self.spec.name, f"model file {self._path} does not exist")
        return self._path


class LlamaCppBackend(LocalFileBackend):
    """A GGUF model run in this process by llama-cpp-python. Not thread-safe: `ModelPool` serialises calls."""

    backend = "llama_cpp"

    def __init__(self, spec: ModelSpec, *, clock: Callable[[], float] = time.monotonic) -> None:
        if spec.backend != "llama_cpp":
            raise ValueError(f"model {spec.name!r} has backend {spec.backend!r}, not 'llama_cpp'")
        self.spec = spec
        self._clock = clock
        self._llm: Any = None
        self._path: Path | None = spec.resolved_path()

    def __repr__(self) -> str:
        return f"LlamaCppBackend({self.spec.name!r}, path={str(self._path)!r}, loaded={self.loaded})"

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    @property
    def path(self) -> Path | None:
        return self._path

    def load(self) -> float:
        """Load the GGUF if not loaded yet; returns the seconds it took (0.0 when already loaded)."""
        if self._llm is not None:
            return 0.0
        name = self.spec.name
        path = self._model_file()
        try:
            import llama_cpp
        except ImportError as exc:
            raise ModelMissing(
                name, f"llama-cpp-python is not installed ({exc}); see deploy/install_llama.sh"
            ) from None
        started = time.perf_counter()
        kwargs: dict[str, Any] = {
            "model_path": str(path),
            "n_ctx": self.spec.context_size,
            "n_gpu_layers": self.spec.gpu_layers,
            "verbose": False,
        }
        if self.spec.threads is not None:
            kwargs["n_threads"] = self.spec.threads
        if self.spec.chat_format:
            kwargs["chat_format"] = self.spec.chat_format
        try:
            self._llm = llama_cpp.Llama(**kwargs)
        except Exception as exc:  # llama_cpp raises ValueError/RuntimeError on a bad file
            raise ModelCallError(name, f"could not load {path}: {exc}") from exc
        seconds = time.perf_counter() - started
        log.info("model loaded", extra={"model": name, "seconds": round(seconds, 3)})
        return seconds

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            closer = getattr(llm, "close", None)
            if callable(closer):
                try:
                    closer()
                except Exception:  # pragma: no cover - freeing must never take a worker down
                    log.exception("closing model %s failed", self.spec.name)

    def complete(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        json_schema: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> Completion:
        """Generate a chat answer. Timeout is checked between streamed tokens (prompt eval can't be cut).

        Of a route's `extra_body`, the sampling settings llama.cpp shares with llama_cpp.server
        apply (so one route gives the same answers in-process and served); the rest is ignored.
        """
        name = self.spec.name
        msgs = validate_messages(messages)
        load_seconds = self.load()
        llm = self._llm
        import llama_cpp

        timeout = self.spec.timeout if timeout is None else timeout
        kwargs: dict[str, Any] = {
            "messages": msgs,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
        }
        if json_schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": dict(json_schema)}
            kwargs["repeat_penalty"] = 1.0  # a penalty breaks the grammar-constrained JSON
        kwargs.update({k: v for k, v in (extra_body or {}).items() if k in LOCAL_SAMPLING_KEYS})
        # Streamed chunks carry no usage: a logits processor sees the prompt (its first call)
        # and every sampled token, which gives exactly the counts a non-streamed call reports.
        counts = {"prompt": 0, "sampled": 0}
        expired = threading.Event()
        eos = llm.token_eos()

        def count_tokens(input_ids: Any, scores: Any) -> Any:
            if counts["sampled"] == 0:
                counts["prompt"] = len(input_ids)
            counts["sampled"] += 1
            if deadline.passed():
                # Runs in a ctypes callback (exceptions are swallowed there), so end the
                # generation by forcing end-of-sequence; a JSON grammar would reject that,
                # so constrained output relies on the check between chunks below.
                expired.set()
                if json_schema is None and 0 <= eos < len(scores):
                    scores[:] = -float("inf")
                    scores[eos] = 0.0
            return scores

        deadline = _Deadline(name, timeout, self._clock)
        kwargs["logits_processor"] = llama_cpp.LogitsProcessorList([count_tokens])
        started = self._clock()
        first: float | None = None
        parts: list[str] = []
        chunks = 0
        finish: str | None = None
        stream = None
        try:
            stream = llm.create_chat_completion(**kwargs)
            for chunk in stream:
                choice = (chunk.get("choices") or [{}])[0]
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if first is None:
                        first = self._clock() - started
                    parts.append(content)
                    chunks += 1
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                deadline.check(f"{chunks} tokens streamed")
        except ModelTimeout:
            raise
        except ValueError as exc:
            if CONTEXT_OVERFLOW.search(str(exc)):
                raise ModelContextOverflow(name, f"the prompt does not fit: {exc}") from exc
            raise ModelCallError(name, f"generation failed: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            raise ModelCallError(name, f"generation failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if stream is not None and hasattr(stream, "close"):
                stream.close()
        if expired.is_set():
            deadline.check(f"{counts['sampled']} tokens sampled")
        seconds = self._clock() - started
        text = "".join(parts)
        tokens_in = counts["prompt"]
        # A "stop" ends on a sampled end-of-generation token that is not part of the answer.
        tokens_out = max(0, counts["sampled"] - (1 if finish == "stop" else 0))
        return Completion(
            text=text,
            model=name,
            backend=self.backend,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            seconds=seconds,
            first_token_seconds=first,
            load_seconds=load_seconds,
            finish_reason=finish,
        )


class OpenAIBackend:
    """Any OpenAI-compatible chat endpoint (a cloud API, Ollama, vLLM, llama_cpp.server). Thread-safe."""

    backend = "openai"

    def __init__(self, spec: ModelSpec, *, clock: Callable[[], float] = time.monotonic) -> None:
        if spec.backend != "openai":
            raise ValueError(f"model {spec.name!r} has backend {spec.backend!r}, not 'openai'")
        self.spec = spec
        self._clock = clock
        self._client: Any = None
        self._lock = threading.Lock()
        # Fail early, naming the variable (never its value).
        self._api_key()

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.spec.name!r}, model={self.spec.model!r}, base_url={self.spec.base_url!r})"

    def _api_key(self) -> str:
        env = self.spec.api_key_env
        if env is None:
            return "none"
        if env not in os.environ:
            raise ModelConfigError(self.spec.name, f"environment variable {env} (its api_key_env) is not set")
        return os.environ[env] or "none"

    @property
    def loaded(self) -> bool:
        return self._client is not None

    def available(self) -> bool:
        return True

    def memory_bytes(self) -> int:
        return 0

    def load(self) -> float:
        """Build the HTTP client (no request is made); returns the seconds it took, 0.0 if built."""
        if self._client is not None:
            return 0.0
        with self._lock:
            if self._client is not None:
                return 0.0
            try:
                import openai
            except ImportError as exc:
                raise ModelMissing(self.spec.name, f"the openai package is not installed ({exc})") from None
            started = time.perf_counter()
            self._client = openai.OpenAI(
                base_url=self.spec.base_url,
                api_key=self._api_key(),
                timeout=self.spec.timeout,
                max_retries=0,
            )
            return time.perf_counter() - started

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # pragma: no cover
                log.exception("closing client of %s failed", self.spec.name)

    def _reset_client(self) -> None:
        with self._lock:
            self.close()

    def _stream(
        self, kwargs: dict[str, Any], deadline: _Deadline, timeout: float, started: float
    ) -> tuple[float | None, list[str], int, str | None, Any]:
        """One streamed request: (first token seconds, text parts, chunks, finish reason, usage)."""
        import openai

        name = self.spec.name
        first: float | None = None
        parts: list[str] = []
        chunks = 0
        finish: str | None = None
        usage: Any = None
        stream = None
        try:
            stream = self._client.with_options(timeout=timeout).chat.completions.create(**kwargs)
            for chunk in stream:
                if getattr(chunk, "usage", None) is not None:
                    usage = chunk.usage
                for choice in chunk.choices or []:
                    content = choice.delta.content if choice.delta is not None else None
                    if content:
                        if first is None:
                            first = self._clock() - started
                        parts.append(content)
                        chunks += 1
                    if choice.finish_reason:
                        finish = choice.finish_reason
                deadline.check(f"{chunks} chunks streamed")
        except ModelTimeout:
            raise
        except openai.APITimeoutError as exc:
            raise ModelTimeout(name, f"no answer within {timeout:g}s from {self.spec.base_url}") from exc
        except openai.APIConnectionError as exc:
            raise ModelConnectionError(name, f"cannot reach {self.spec.base_url}: {exc}") from exc
        except openai.APIStatusError as exc:
            message = _short(exc.message)
            if CONTEXT_OVERFLOW.search(str(exc.message)) or CONTEXT_OVERFLOW.search(str(exc.body)):
                raise ModelContextOverflow(name, f"the prompt does not fit: {message}") from exc
            raise ModelCallError(name, f"HTTP {exc.status_code} from {self.spec.base_url}: {message}") from exc
        except openai.OpenAIError as exc:
            raise ModelCallError(name, f"{type(exc).__name__}: {_short(str(exc))}") from exc
        finally:
            if stream is not None and hasattr(stream, "close"):
                try:
                    stream.close()
                except Exception:
                    pass
        return first, parts, chunks, finish, usage

    def complete(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        json_schema: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> Completion:
        """`extra_body` (a route's) is merged over the model's own `extra_body`."""
        name = self.spec.name
        msgs = validate_messages(messages)
        load_seconds = self.load()
        timeout = self.spec.timeout if timeout is None else timeout
        kwargs: dict[str, Any] = {
            "model": self.spec.model,
            "messages": msgs,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if json_schema is not None:
            # llama_cpp.server constrains output with this; its "json_schema" type answers HTTP 500.
            kwargs["response_format"] = {"type": "json_object", "schema": dict(json_schema)}
        body = {**self.spec.extra_body, **(extra_body or {})}
        if body:
            kwargs["extra_body"] = body
        deadline = _Deadline(name, timeout, self._clock)
        started = self._clock()
        attempt = 0
        while True:
            try:
                streamed = self._stream(kwargs, deadline, timeout, started)
                break
            except ModelConnectionError:
                self._reset_client()
                if attempt >= CONNECTION_RETRIES or deadline.passed():
                    raise
                attempt += 1
                log.info("model connection failed; retrying once on a fresh connection", extra={"model": name})
                self.load()
            except ModelError:
                # A broken stream may leave its connection in the pool: start the next call afresh.
                self._reset_client()
                raise
        first, parts, chunks, finish, usage = streamed
        if finish is None:
            self._reset_client()
            raise ModelCallError(
                name,
                f"the stream from {self.spec.base_url} ended without a finish reason after {chunks} chunks "
                "(the server stopped mid-answer)",
            )
        seconds = self._clock() - started
        text = "".join(parts)
        if usage is not None and getattr(usage, "completion_tokens", None) is not None:
            tokens_in = int(usage.prompt_tokens or 0)
            tokens_out = int(usage.completion_tokens or 0)
        else:
            tokens_in = _estimate_tokens(m["content"] for m in msgs)
            tokens_out = chunks
        return Completion(
            text=text,
            model=name,
            backend=self.backend,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            seconds=seconds,
            first_token_seconds=first,
            load_seconds=load_seconds,
            finish_reason=finish,
        )


def _estimate_tokens(texts: Iterable[str]) -> int:
    """About 4 characters a token, for servers that report no usage."""
    return sum(max(1, len(t) // 4) for t in texts)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def make_backend(spec: ModelSpec, *, clock: Callable[[], float] = time.monotonic) -> Backend:
    """The backend object for `spec` (nothing is loaded yet)."""
    if spec.backend == "llama_cpp":
        return LlamaCppBackend(spec, clock=clock)
    if spec.backend == "ctransformers":
        # Imported here: that module imports this one (Completion, validate_messages).
        from edgefleet.models.ctransformers_backend import CTransformersBackend

        return CTransformersBackend(spec, clock=clock)
    return OpenAIBackend(spec, clock=clock)
