"""The node benchmark: a single-core CPU score and the generation speed of each local model.

The figures go into the node's heartbeat (`NodeInfo.bench`), so `GET /v1/workers` and
`edgefleet workers` show them and the dispatcher places model steps on the fastest box
(`edgefleet.scheduling.affinity`). A node measures once at start and again when an
operator asks (`edgefleet workers --bench` -> `POST /v1/workers/bench` -> a request
number in Redis that each node's heartbeat loop reads).

The measurement runs in a child process (`python -m workers.bench`, specs on stdin, one
JSON result on stdout): a model loaded for it never stays in the supervisor's memory, and
the supervisor's heartbeat and /metrics threads never wait for the GIL behind it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from edgefleet.schemas import NodeBench

if TYPE_CHECKING:
    from edgefleet.models.config import ModelSpec
    from edgefleet.settings import Settings

log = logging.getLogger(__name__)

CPU_SECONDS = 0.3
BENCH_TOKENS = 64
# Asks for a long answer, so that a model rarely stops before the token budget.
BENCH_PROMPT = "Count from 1 to 300 in words, separated by commas."
_BLOCK = bytes(range(256)) * 16  # 4 KiB


class BenchInput(BaseModel):
    """What the supervisor sends the child on stdin."""

    models: list[dict[str, object]] = Field(default_factory=list, description="ModelSpec dumps, llama_cpp only")
    tokens: int = BENCH_TOKENS
    cpu_seconds: float = CPU_SECONDS
    model_timeout: float = 120.0


def _unit(block: bytes) -> int:
    """One unit of fixed work: a sha256 of 4 KiB (C speed) and 200 pure-Python multiply-adds
    (interpreter speed), so the score reflects both what plugins in Python and hashing cost."""
    acc = hashlib.sha256(block).digest()[0]
    for i in range(200):
        acc = (acc * 31 + i) & 0xFFFFFFFF
    return acc


def cpu_score(seconds: float = CPU_SECONDS) -> float:
    """Units of `_unit` per second on one core, run for about `seconds`."""
    units = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(16):
            _unit(_BLOCK)
        units += 16
        now = time.perf_counter()
        if now >= deadline:
            return units / (now - started)


def model_tokens_per_s(spec: ModelSpec, tokens: int = BENCH_TOKENS, timeout: float = 120.0) -> float:
    """Decode speed of `tokens` greedy tokens, with the model loaded as a worker loads it
    (same threads, GPU layers and context); the load itself is not counted."""
    from edgefleet.models.backends import LlamaCppBackend

    backend = LlamaCppBackend(spec)
    try:
        backend.load()
        completion = backend.complete(
            [{"role": "user", "content": BENCH_PROMPT}], max_tokens=tokens, temperature=0.0, timeout=timeout
        )
    finally:
        backend.close()
    if completion.tokens_out < 2:
        raise ValueError(f"the model answered {completion.tokens_out} token(s); no speed to measure")
    return completion.tokens_per_second


def measure(request: BenchInput) -> NodeBench:
    """The whole benchmark, in this process: CPU first, then each model in turn."""
    from edgefleet.models.config import ModelSpec

    started = time.perf_counter()
    errors: dict[str, str] = {}
    score: float | None = None
    try:
        score = round(cpu_score(request.cpu_seconds), 1)
    except Exception as exc:
        errors["cpu"] = f"{type(exc).__name__}: {exc}"
    speeds: dict[str, float] = {}
    for raw in request.models:
        spec = ModelSpec.model_validate(raw)
        try:
            speeds[spec.name] = round(model_tokens_per_s(spec, request.tokens, request.model_timeout), 2)
        except Exception as exc:
            errors[spec.name] = f"{type(exc).__name__}: {exc}"[:300]
    return NodeBench(
        cpu_score=score,
        tokens_per_s=speeds,
        errors=errors,
        measured_at=time.time(),
        seconds=round(time.perf_counter() - started, 3),
    )


def local_models(settings: Settings) -> list[ModelSpec]:
    """The llama_cpp models of this box's models config whose file is here (remote endpoints
    are not a property of the box, and a missing file has no speed)."""
    from edgefleet.models.config import load_models_config
    from edgefleet.models.errors import ModelsConfigError

    try:
        config = load_models_config(settings)
    except (ModelsConfigError, OSError):
        return []  # the node logs the broken config already
    return [spec for spec in config.models.values() if spec.backend == "llama_cpp" and spec.file_exists()]


class NodeBenchmark:
    """The supervisor's side: runs the child on a background thread, keeps the last figures.

    `request(n)` asks for a benchmark answering request number `n`; requests that arrive
    while one runs are served by one more run after it, never by two at once."""

    def __init__(self, settings: Settings, models: list[ModelSpec]) -> None:
        self.settings = settings
        self.models = models
        self._lock = threading.Lock()
        self._wanted = -1
        self._done = -1
        self._thread: threading.Thread | None = None
        self.last: NodeBench | None = None

    @property
    def running(self) -> bool:
        with self._lock:
            return self._thread is not None

    def request(self, number: int) -> None:
        with self._lock:
            self._wanted = max(self._wanted, number)
            if self._thread is not None or self._done >= self._wanted:
                return
            self._thread = threading.Thread(target=self._loop, name="node-bench", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._done >= self._wanted:
                    self._thread = None
                    return
                number = self._wanted
            started = time.perf_counter()
            result, failure = self._run_child()
            if result is None:
                # The figures measured before stay; the error says why they were not renewed.
                before = self.last or NodeBench(measured_at=0.0, seconds=0.0)
                result = before.model_copy(
                    update={
                        "errors": {**before.errors, "bench": failure},
                        "measured_at": time.time(),
                        "seconds": round(time.perf_counter() - started, 3),
                    }
                )
            result = result.model_copy(update={"request": number})
            self.last = result
            log.info(
                "node benchmark",
                extra={
                    "cpu_score": result.cpu_score,
                    "tokens_per_s": result.tokens_per_s,
                    "errors": result.errors,
                    "seconds": result.seconds,
                    "request": number,
                },
            )
            with self._lock:
                self._done = max(self._done, number)

    def _run_child(self) -> tuple[NodeBench | None, str]:
        """The child's figures, or None and why not."""
        timeout = self.settings.node_bench_timeout
        payload = BenchInput(
            models=[spec.model_dump(mode="json") for spec in self.models],
            model_timeout=max(1.0, timeout / max(1, len(self.models)) - 1.0),
        ).model_dump_json()
        try:
            done = subprocess.run(
                [sys.executable, "-m", "edgefleet.workers.bench"],
                input=payload.encode(),
                capture_output=True,
                timeout=timeout,
                env=dict(os.environ),
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None, f"took longer than {timeout:g}s (EDGEFLEET_NODE_BENCH_TIMEOUT)"
        except OSError as exc:
            return None, f"did not start: {exc}"
        if done.returncode != 0:
            log.warning(
                "node benchmark failed",
                extra={
                    "code": done.returncode,
                    "stderr": done.stderr.decode(errors="replace")[-2000:],
                },
            )
            return None, f"exited with code {done.returncode} (see the node's log)"
        try:
            return NodeBench.model_validate_json(done.stdout.decode(errors="replace").strip().splitlines()[-1]), ""
        except (ValueError, IndexError) as exc:
            return None, f"answered garbage: {str(exc)[:200]}"


def main() -> int:
    # llama.cpp writes its own progress to stderr; the answer is the last line on stdout.
    request = BenchInput.model_validate_json(sys.stdin.read() or "{}")
    print(measure(request).model_dump_json(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
