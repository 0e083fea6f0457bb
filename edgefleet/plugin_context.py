"""`PluginContext`: what every plugin function receives as its first argument.

Plugins never talk to Redis or Celery themselves. The worker hands them this
object, which carries the subtask's identity, its private workspace, its
deadline, and two callbacks (is it cancelled? report progress). Cancellation
is cooperative (see DESIGN.md: no `revoke(terminate=True)`), so plugins poll
`cancelled` or call `sleep()`/`check_cancelled()` in their loops.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# A cancelled subtask notices within this many seconds while in `sleep()`.
SLEEP_SLICE_S = 0.1


class SubtaskCancelled(Exception):
    """Raised by a plugin that stops because it was cancelled or ran out of time."""

    def __init__(self, reason: str = "subtask was cancelled", *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out


class PathOutsideWorkspace(ValueError):
    """A path meant to stay in the workspace points outside it."""


def _never_cancelled() -> bool:
    return False


def _ignore_progress(fraction: float, message: str) -> None:
    return None


def _discard_checkpoint(state: Any) -> None:
    return None


class ModelUnavailable(RuntimeError):
    """No model can serve this task type here; plugins fall back (e.g. to an extractive method)."""


ModelCall = Callable[[dict[str, Any]], dict[str, Any]]


class ModelReply:
    """One model answer, with who served it and what was tried first."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.text: str = data["text"]
        self.model: str = data["model"]
        self.fell_back_from: list[tuple[str, str]] = [tuple(f) for f in data.get("fell_back_from", [])]
        self.tokens_in: int = int(data.get("tokens_in", 0))
        self.tokens_out: int = int(data.get("tokens_out", 0))
        self.seconds: float = float(data.get("seconds", 0.0))
        self.load_seconds: float = float(data.get("load_seconds") or 0.0)  # 0 when the model was warm
        self.first_token_seconds: float | None = data.get("first_token_seconds")

    def __str__(self) -> str:
        return self.text

    def json(self) -> Any:
        """The reply parsed as JSON (ask with `json_schema=` to get valid JSON)."""
        return json.loads(self.text)


class ModelHandle:
    """The model that serves one task type, as the worker's model router routes it."""

    def __init__(self, task_type: str, call: ModelCall) -> None:
        self.task_type = task_type
        self._call = call

    def chat(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
    ) -> ModelReply:
        answer = self._call(
            {
                "task_type": self.task_type,
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "json_schema": json_schema,
            }
        )
        if not answer.get("ok"):
            raise ModelUnavailable(answer.get("error") or f"no model served {self.task_type!r}")
        return ModelReply(answer["completion"])

    def generate(self, prompt: str, *, system: str | None = None, **options: Any) -> ModelReply:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.chat(messages, **options)

    __call__ = generate


class PluginContext:
    """The running subtask as a plugin sees it."""

    def __init__(
        self,
        *,
        job_id: str,
        subtask_id: str,
        attempt: int,
        workspace: Path,
        deadline: float,
        is_cancelled: Callable[[], bool] = _never_cancelled,
        report_progress: Callable[[float, str], None] = _ignore_progress,
        save_checkpoint: Callable[[Any], None] = _discard_checkpoint,
        checkpoint: Any = None,
        model_call: ModelCall | None = None,
    ) -> None:
        """`deadline` is a `time.monotonic()` value; the callbacks come from the worker."""
        self._job_id = job_id
        self._subtask_id = subtask_id
        self._attempt = attempt
        self._workspace = Path(workspace)
        self._deadline = deadline
        self._is_cancelled = is_cancelled
        self._report_progress = report_progress
        self._save_checkpoint = save_checkpoint
        self._checkpoint = checkpoint
        self._model_call = model_call

    def __repr__(self) -> str:
        return (
            f"PluginContext(job_id={self._job_id!r}, subtask_id={self._subtask_id!r}, "
            f"attempt={self._attempt}, workspace={str(self._workspace)!r})"
        )

    @property
    def job_id(self) -> str:
        return self._job_id

    @property
    def subtask_id(self) -> str:
        return self._subtask_id

    @property
    def attempt(self) -> int:
        """1 for the first run, 2 for the first retry, ..."""
        return self._attempt

    @property
    def workspace(self) -> Path:
        """This subtask's own directory; files written here are the step's outputs."""
        return self._workspace

    @property
    def deadline(self) -> float:
        return self._deadline

    @property
    def expired(self) -> bool:
        """The attempt's time is up (its `timeout` has passed)."""
        return time.monotonic() >= self._deadline

    @property
    def cancelled(self) -> bool:
        """True once the job or subtask was cancelled, or the deadline has passed."""
        return self.expired or bool(self._is_cancelled())

    def time_left(self) -> float:
        """Seconds until the deadline, never negative."""
        return max(0.0, self._deadline - time.monotonic())

    def progress(self, fraction: float, message: str = "") -> None:
        """Report how far along the subtask is; `fraction` is clamped to 0..1."""
        if math.isnan(fraction):
            fraction = 0.0
        self._report_progress(min(1.0, max(0.0, float(fraction))), message)

    def checkpoint(self, state: Any) -> None:
        """Save JSON-serialisable progress state; a rerun of this subtask gets it from `resume()`.

        Save after each unit of work is durable (its output written), so that resuming
        never skips work that was lost and never redoes work that was kept.
        """
        json.dumps(state)  # fail here, in the plugin, rather than in the worker
        self._checkpoint = state
        self._save_checkpoint(state)

    def resume(self) -> Any:
        """The last checkpoint of an earlier attempt of this subtask, or None on a fresh start."""
        return self._checkpoint

    def model(self, task_type: str) -> ModelHandle:
        """The model for `task_type` (e.g. "summarize"), routed by the worker with its fallbacks.

        Calls raise ModelUnavailable when no model (primary or fallback) can serve it:
        plugins that have a non-model way (an extractive summary, a rule) should use it then.
        """
        if self._model_call is None:
            raise ModelUnavailable(f"no model serves task type {task_type!r} here")
        return ModelHandle(task_type, self._model_call)

    def sleep(self, seconds: float) -> bool:
        """Sleep, waking every 0.1 s to look for cancellation.

        Returns True after sleeping the full time, False as soon as the subtask
        is cancelled or out of time.
        """
        if self.cancelled:
            return False
        end = time.monotonic() + max(0.0, seconds)
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return True
            time.sleep(min(SLEEP_SLICE_S, remaining))
            if self.cancelled:
                return False

    def check_cancelled(self) -> None:
        """Raise SubtaskCancelled if the subtask should stop now."""
        if self.expired:
            raise SubtaskCancelled("subtask ran past its timeout", timed_out=True)
        if self._is_cancelled():
            raise SubtaskCancelled("subtask was cancelled")

    def workspace_path(self, relative: str | Path) -> Path:
        """A path inside the workspace for a file the plugin writes.

        Refuses absolute paths and `..` escapes: outputs must stay where the
        worker can find (and clean up) them.
        """
        rel = Path(relative)
        if rel.is_absolute() or not str(relative).strip():
            raise PathOutsideWorkspace(f"{str(relative)!r} must be a relative path inside the workspace")
        root = self._workspace.resolve()
        target = (root / rel).resolve()
        if target == root or not target.is_relative_to(root):
            raise PathOutsideWorkspace(f"{str(relative)!r} points outside the workspace")
        return target

    def input_path(self, path: str | Path) -> Path:
        """A path the plugin reads: relative ones are resolved in the workspace, absolute ones kept."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self._workspace / p)
