"""The sandbox pipe's messages, one JSON object per line, shared by both ends.

Parent (workers/sandbox.py) to launcher (workers/sandbox_launcher.py): `prepare`,
then `run`, later possibly `cancel` and `model_reply`. Launcher to parent:
`progress`, `checkpoint`, `model_call`, and finally one `result` or `error`. An
executor (`serve: many`) takes further `run`s, one at a time, and ends each with
`ended` once the subtask's process and all it started are gone.
TypedDicts, not pydantic: the launcher imports this before every subtask and
must start in milliseconds; the parent bounds each line's size before parsing.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

ErrorKind = Literal["setup", "cancelled", "exception"]


class LandlockRules(TypedDict):
    read: list[str]
    write: list[str]
    list: list[str]


class Prepare(TypedDict):
    type: Literal["prepare"]
    plugin: str
    folder: str
    entry_point: str
    permissions: list[str]
    limits: dict[str, Any]
    max_output_bytes: int
    seccomp: bool  # false where the box has no libseccomp: the launcher runs without the filter
    shared: bool  # `isolation: shared`: an executor under bwrap runs its subtasks in its own process
    landlock: NotRequired[LandlockRules]
    # "many": an executor (workers/sandbox_zygote.py) that serves `run`s one after another;
    # under Landlock, the workspaces its subtasks will have: each one's layer keeps only its own.
    serve: NotRequired[Literal["one", "many"]]
    executor_slots: NotRequired[list[str]]


class Run(TypedDict):
    type: Literal["run"]
    action: str
    args: dict[str, Any]
    job_id: str
    subtask_id: str
    attempt: int
    workspace: str
    timeout: float
    checkpoint: Any


class Cancel(TypedDict):
    type: Literal["cancel"]


class ModelReply(TypedDict, total=False):
    type: Literal["model_reply"]
    id: int
    ok: bool
    error: str
    text: str


class Progress(TypedDict):
    type: Literal["progress"]
    fraction: float
    message: str


class Checkpoint(TypedDict):
    type: Literal["checkpoint"]
    state: Any


class ModelCall(TypedDict, total=False):
    """A `ctx.model(...)` request; its fields beyond `type` and `id` are the model layer's."""

    type: Literal["model_call"]
    id: int


class Result(TypedDict):
    type: Literal["result"]
    output: Any


class Error(TypedDict):
    type: Literal["error"]
    kind: ErrorKind
    error: str
    timed_out: NotRequired[bool]


class Ended(TypedDict):
    """An executor's word that a subtask's process has ended and all it started is gone: the
    subtask's end (a one-shot launcher's end is its exit). `cpu` and `max_rss_kb`: the child's."""

    type: Literal["ended"]
    exit: int | None
    signal: int | None
    cpu: float
    max_rss_kb: int


ToLauncher = Prepare | Run | Cancel | ModelReply
FromLauncher = Progress | Checkpoint | ModelCall | Result | Error | Ended
Final = Result | Error


def progress(fraction: float, message: str) -> Progress:
    return {"type": "progress", "fraction": fraction, "message": message}


def checkpoint(state: Any) -> Checkpoint:
    return {"type": "checkpoint", "state": state}


def result(output: Any) -> Result:
    return {"type": "result", "output": output}


def error(kind: ErrorKind, detail: str, *, timed_out: bool = False) -> Error:
    return {"type": "error", "kind": kind, "error": detail, "timed_out": timed_out}


def ended(exit_code: int | None, signum: int | None, cpu: float, max_rss_kb: int) -> Ended:
    return {"type": "ended", "exit": exit_code, "signal": signum, "cpu": cpu, "max_rss_kb": max_rss_kb}


CANCEL: Cancel = {"type": "cancel"}
