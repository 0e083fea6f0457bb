"""`ctransformers` backend: GGML-era model files run in a child process, so a crash fails one call.

ctransformers bundles a 2023 llama.cpp/ggml: it reads the older GGML/early-GGUF files and
architectures (gpt2, gptj, mpt, falcon, starcoder...) that today's llama.cpp dropped, cannot read
current GGUF files, and segfaults on some. So the model lives in ``python -m
edgefleet.models.ctransformers_child``, spoken to in JSON lines over its pipes: a crash there
becomes a `ModelCallError` naming the model and the signal, the router moves on to the route's
next model, and the next call on this model starts a fresh child. The child gets only an
allowlisted environment (no API keys or tokens of the worker's).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from edgefleet.models.backends import Completion, LocalFileBackend, Message, validate_messages
from edgefleet.models.config import ModelSpec
from edgefleet.models.errors import (
    ModelCallError,
    ModelConfigError,
    ModelContextOverflow,
    ModelMissing,
    ModelTimeout,
)

log = logging.getLogger(__name__)

CHILD_MODULE = "edgefleet.models.ctransformers_child"
# Loading is not bounded by a call's timeout (as for llama_cpp, the pool does not count it), but a
# child that hangs while loading must not hold the model forever.
LOAD_TIMEOUT_S = 300.0
MAX_LINE_BYTES = 8_000_000
STDERR_LINES = 40
# The worker's environment minus its secrets: what Python, the C library and the GPU runtime need.
ENV_ALLOWED = ("PATH", "HOME", "LANG", "TMPDIR", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "OMP_NUM_THREADS")
ENV_PREFIXES = ("LC_", "CUDA_")
# Sampling settings of a route's `extra_body` that ctransformers understands, by its own names.
SAMPLING_KEYS = {"repeat_penalty": "repetition_penalty", "top_k": "top_k", "top_p": "top_p", "seed": "seed"}


class _ChildGone(Exception):
    """The child closed its answers: it exited or was killed."""


class _Expired(Exception):
    pass


def render_prompt(messages: Sequence[Mapping[str, str]], chat_format: str) -> tuple[str, list[str]]:
    """The plain-text prompt for `messages` and the strings that end the assistant's turn."""
    if chat_format == "chatml":
        parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
        return "".join(parts) + "<|im_start|>assistant\n", ["<|im_end|>", "<|im_start|>"]
    parts = [f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages]
    return "".join(parts) + "Assistant:", ["\nUser:", "\nSystem:"]


def child_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ENV_ALLOWED or k.startswith(ENV_PREFIXES)}
    # The child imports edgefleet from the same place as this process, installed or not.
    package_root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    env["HF_HUB_OFFLINE"] = "1"  # a local file only: ctransformers must never reach for the hub
    env["PYTHONUNBUFFERED"] = "1"
    return env


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Child:
    """One running child: send a request, read its answers line by line with a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self._buffer = b""
        self.stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._drain = threading.Thread(target=self._read_stderr, name="ctransformers-stderr", daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        stream: IO[bytes] | None = self.proc.stderr
        if stream is None:
            return
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.stderr.append(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, request: Mapping[str, Any]) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps(request).encode() + b"\n")
            stdin.flush()
        except (BrokenPipeError, ValueError):
            raise _ChildGone() from None

    def read(self, deadline: float) -> dict[str, Any]:
        """The next answer; `_Expired` past `deadline` (time.monotonic), `_ChildGone` at its end."""
        stdout = self.proc.stdout
        assert stdout is not None
        fd = stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Expired()
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise _ChildGone()
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE_BYTES:
                raise _ChildGone()
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            answer = json.loads(line)
        except ValueError:
            raise _ChildGone() from None
        if not isinstance(answer, dict):
            raise _ChildGone()
        return answer

    def exit_text(self) -> str:
        """How the child ended (waits briefly for it), with the last lines it printed."""
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.returncode
        self._drain.join(timeout=2)
        tail = self.tail()
        return describe_exit(code) + (f"; it printed: {tail}" if tail else "")

    def tail(self, lines: int = 3) -> str:
        return " | ".join(list(self.stderr)[-lines:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not wait on the child
            log.warning("ctransformers child %s did not exit after SIGKILL", self.proc.pid)

    def close(self) -> None:
        """End of stdin asks it to exit; killed if it does not within a few seconds."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
        self._drain.join(timeout=2)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class CTransformersBackend(LocalFileBackend):
    """A model file run by ctransformers in a child process. Not thread-safe: `ModelPool` serialises calls."""

    backend = "ctransformers"

    def __init__(self, spec: ModelSpec, *, clock: Callable[[], float] = time.monotonic) -> None:
        if spec.backend != "ctransformers":
            raise ValueError(f"model {spec.name!r} has backend {spec.backend!r}, not 'ctransformers'")
        self.spec = spec
        self._clock = clock
        self._path: Path | None = spec.resolved_path()
        self._child: _Child | None = None

    def __repr__(self) -> str:
        return f"CTransformersBackend({self.spec.name!r}, path={str(self._path)!r}, loaded={self.loaded})"

    @property
    def loaded(self) -> bool:
        return self._child is not None and self._child.alive()

    @property
    def pid(self) -> int | None:
        """The child's process id while one runs (None otherwise)."""
        return self._child.proc.pid if self.loaded and self._child is not None else None

    def load(self) -> float:
        """Start the child and load the file in it; seconds it took (0.0 when it runs already)."""
        if self.loaded:
            return 0.0
        self._drop_child()
        name = self.spec.name
        path = self._model_file()
        if importlib.util.find_spec("ctransformers") is None:
            raise ModelMissing(name, "ctransformers is not installed: pip install 'edgefleet[ctransformers]'")
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", CHILD_MODULE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_environment(),
            close_fds=True,
        )
        child = _Child(proc)
        request = {
            "op": "load",
            "path": str(path),
            "model_type": self.spec.model_type,
            "context_length": self.spec.context_size,
            "threads": self.spec.threads,
            "gpu_layers": self.spec.gpu_layers,
        }
        try:
            child.send(request)
            answer = child.read(time.monotonic() + LOAD_TIMEOUT_S)
        except _ChildGone:
            ended = child.exit_text()
            child.close()
            raise ModelCallError(
                name, f"could not load {path}: the ctransformers child process died ({ended})"
            ) from None
        except _Expired:
            child.kill()
            child.close()
            raise ModelTimeout(name, f"ctransformers did not load {path} within {LOAD_TIMEOUT_S:g}s") from None
        if answer.get("event") != "loaded":
            child.close()
            message = str(answer.get("message") or answer)
            if child.tail():
                message += f"; it printed: {child.tail()}"  # ggml says why (e.g. no tokenizer scores)
            if answer.get("kind") == "missing":
                raise ModelMissing(name, message)
            raise ModelCallError(
                name,
                f"ctransformers could not load {path} as {self.spec.model_type!r}: {message} "
                "(its 2023 llama.cpp reads GGML and early GGUF files, not current ones)",
            )
        self._child = child
        seconds = time.perf_counter() - started
        log.info("model loaded", extra={"model": name, "seconds": round(seconds, 3), "pid": proc.pid})
        return seconds

    def _drop_child(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.kill()
            child.close()

    def close(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.close()

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
        """Generate a chat answer, streamed token by token from the child.

        A timeout kills the child (a generation cannot be interrupted in it); the next call starts
        a new one. A JSON schema is refused (`config`): ctransformers cannot constrain its output.
        """
        name = self.spec.name
        msgs = validate_messages(messages)
        if json_schema is not None:
            raise ModelConfigError(
                name, "ctransformers cannot constrain output to a JSON schema; route such calls to llama_cpp or openai"
            )
        load_seconds = self.load()
        child = self._child
        assert child is not None
        timeout = self.spec.timeout if timeout is None else timeout
        prompt, stops = render_prompt(msgs, self.spec.chat_format or "plain")
        request: dict[str, Any] = {
            "op": "complete",
            "prompt": prompt,
            "max_new_tokens": max_tokens,
            "temperature": temperature,
            "stop": stops,
        }
        body = {**self.spec.extra_body, **(extra_body or {})}
        request.update({ours: body[theirs] for theirs, ours in SAMPLING_KEYS.items() if theirs in body})
        started = self._clock()
        deadline = time.monotonic() + timeout
        first: float | None = None
        parts: list[str] = []
        try:
            child.send(request)
            while True:
                answer = child.read(deadline)
                event = answer.get("event")
                if event == "token":
                    if first is None:
                        first = self._clock() - started
                    parts.append(str(answer.get("text") or ""))
                elif event == "done":
                    break
                elif event == "error":
                    message = str(answer.get("message") or "")
                    if answer.get("kind") == "context":
                        raise ModelContextOverflow(name, f"the prompt does not fit: {message}")
                    raise ModelCallError(name, f"generation failed: {message}")
        except _Expired:
            self._child = None
            child.kill()
            child.close()
            raise ModelTimeout(
                name, f"no complete answer within {timeout:g}s ({len(parts)} tokens streamed; child stopped)"
            ) from None
        except _ChildGone:
            self._child = None
            ended = child.exit_text()
            child.close()
            raise ModelCallError(
                name,
                f"the ctransformers child process died while generating ({ended}); "
                "this call failed, the worker is unharmed",
            ) from None
        return Completion(
            text="".join(parts),
            model=name,
            backend=self.backend,
            tokens_in=int(answer.get("tokens_in") or 0),
            tokens_out=int(answer.get("tokens_out") or 0),
            seconds=self._clock() - started,
            first_token_seconds=first,
            load_seconds=load_seconds,
            finish_reason=str(answer.get("finish_reason") or "stop"),
        )
