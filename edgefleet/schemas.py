"""Pydantic models for everything that crosses a boundary: HTTP, Redis, Celery."""

from __future__ import annotations

import re
from enum import Enum
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, StrictFloat, field_validator

STEP_ID_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
_NODE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ResourceClass(str, Enum):
    cpu = "cpu"
    gpu = "gpu"
    io = "io"


class PriorityClass(str, Enum):
    interactive = "interactive"
    normal = "normal"
    batch = "batch"


class JobState(str, Enum):
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self is not JobState.running


class SubtaskState(str, Enum):
    waiting = "waiting"  # some `needs` are not done yet
    ready = "ready"  # in the class backlog, not yet sent to Celery
    retry_wait = "retry_wait"  # failed, waits for its backoff before it is ready again
    queued = "queued"  # sent to Celery, not yet claimed by a worker
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StepSpec(_Strict):
    """One step of an explicit plan, as a client writes it."""

    id: str = Field(pattern=STEP_ID_PATTERN, description="unique within the job")
    plugin: str = Field(min_length=1, max_length=64)
    action: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)
    needs: list[str] = Field(default_factory=list, max_length=64)
    resource_class: ResourceClass | None = Field(default=None, description="override of the plugin's resource class")
    node: str | None = Field(default=None, description="run only on this node (its direct queue)")
    # strict: `true` or "5" for a number is a client's mistake, reported, not coerced to 1 or 5.
    timeout: float = Field(default=300.0, gt=0, le=86400, strict=True, description="seconds per attempt")
    retries: int = Field(default=0, ge=0, le=20, strict=True, description="extra attempts after a failure")
    retry_backoff: float = Field(default=1.0, ge=0, le=3600, strict=True, description="first backoff, doubles")

    @field_validator("node")
    @classmethod
    def _node_name(cls, value: str | None) -> str | None:
        if value is not None and not _NODE_PATTERN.match(value):
            raise ValueError("node names use letters, digits, '.', '_' and '-'")
        return value


class JobRequest(_Strict):
    """The body of POST /v1/jobs: exactly one of `steps`, `template` or `goal`."""

    steps: list[StepSpec] | None = Field(default=None, max_length=500)
    template: str | None = Field(default=None, min_length=1, max_length=128)
    inputs: dict[str, Any] = Field(default_factory=dict)
    goal: str | None = Field(
        default=None, min_length=1, max_length=2000, description="natural language, planned by a model"
    )
    dry_run: bool = Field(default=False, strict=True, description="validate (and plan a goal) without running")
    priority: PriorityClass = PriorityClass.normal
    callback_url: AnyHttpUrl | None = None
    name: str | None = Field(default=None, max_length=200)
    deadline_s: float | None = Field(
        default=None,
        gt=0,
        le=30 * 86400,
        strict=True,
        description="seconds from submission by which the job should be done; the scheduler "
        "moves its subtasks ahead as the latest start time nears",
    )


class PlanPreview(BaseModel):
    """The answer to a dry run: the validated steps, and who planned them for a goal."""

    dry_run: bool = True
    steps: list[StepSpec]
    subtasks: list[PlannedSubtask]
    model: str | None = None
    fell_back_from: list[tuple[str, str]] = Field(default_factory=list)
    repaired: bool = False


class PlannedSubtask(_Strict):
    """A validated step, with its edges both ways and its class resolved."""

    id: str
    plugin: str
    action: str
    args: dict[str, Any]
    needs: list[str]
    dependents: list[str]
    resource_class: ResourceClass
    node: str | None = None
    timeout: float
    retries: int
    retry_backoff: float


class Plan(_Strict):
    subtasks: list[PlannedSubtask]


class SubtaskEnvelope(_Strict):
    """The Celery message body: just enough to find and claim the subtask."""

    job_id: str
    subtask_id: str
    attempt: int = Field(ge=1)
    plugin: str
    action: str
    resource_class: ResourceClass
    timeout: float
    priority: PriorityClass


class SubtaskStatus(BaseModel):
    id: str
    plugin: str
    action: str
    resource_class: ResourceClass
    state: SubtaskState
    needs: list[str]
    attempt: int
    max_attempts: int
    node: str | None = None
    queue: str | None = None
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    progress: float | None = None
    progress_message: str | None = None
    output: Any = None
    error: str | None = None
    checkpoint: Any = Field(default=None, description="the last state saved by ctx.checkpoint")
    resumed: int = Field(default=0, description="times an attempt started from a checkpoint")
    isolation: str | None = Field(default=None, description="how the last attempt was sandboxed")
    cpu_seconds: float | None = Field(default=None, description="CPU time of the last attempt's processes")
    max_rss_mb: float | None = Field(default=None, description="peak resident memory of the last attempt")
    placement: str | None = Field(
        default=None, description="why the dispatcher sent it to its queue (model steps: warm box, fastest box...)"
    )


ARTIFACT_ID_PATTERN = r"^[0-9a-f]{64}$"  # an artifact's id is the sha256 of its bytes, in hex


class ArtifactInfo(BaseModel):
    """A file that moves between boxes: a step's output file or folder, or a client's upload."""

    id: str = Field(pattern=ARTIFACT_ID_PATTERN, description="sha256 of its bytes (a folder: of its tar)")
    name: str = Field(description="its file (or folder) name")
    size: int = Field(ge=0, description="bytes (a folder: of its tar)")
    kind: Literal["file", "tree"] = Field(default="file", description="tree: a folder, stored as a tar")
    node: str | None = Field(default=None, description="the node that produced it; null for an upload")
    subtask: str | None = Field(default=None, description="the step that produced it; null for an upload")
    path: str | None = Field(default=None, description="where the step wrote it, on its node")
    created_at: float | None = None


class JobStatus(BaseModel):
    id: str
    name: str | None = None
    state: JobState
    priority: PriorityClass
    tenant: str
    created_at: float
    updated_at: float
    finished_at: float | None = None
    error: str | None = None
    failed_subtask: str | None = None
    callback_url: str | None = None
    deadline_at: float | None = Field(default=None, description="created_at + deadline_s, when set")
    expires_at: float | None = Field(
        default=None, description="when the finished job and its events are deleted; null while it runs"
    )
    subtasks: list[SubtaskStatus] = Field(default_factory=list)
    artifacts: list[ArtifactInfo] = Field(
        default_factory=list, description="files its steps reported in their outputs, stored when they succeeded"
    )


class JobSummary(BaseModel):
    id: str
    name: str | None = None
    state: JobState
    priority: PriorityClass
    tenant: str
    created_at: float
    finished_at: float | None = None
    expires_at: float | None = Field(default=None, description="when the finished job is deleted; null while it runs")


class JobPage(BaseModel):
    jobs: list[JobSummary]
    next_cursor: str | None = None


class NodeBench(BaseModel):
    """A node's benchmark (workers/bench.py): how fast this box is, measured on the box itself."""

    cpu_score: float | None = Field(
        default=None, description="single core: units/s of a fixed hashlib + pure-Python workload (higher is faster)"
    )
    tokens_per_s: dict[str, float] = Field(
        default_factory=dict, description="per local model: generation speed of 64 tokens, as the workers load it"
    )
    errors: dict[str, str] = Field(default_factory=dict, description="per model (or `cpu`): why there is no figure")
    measured_at: float = Field(description="when the benchmark finished (the node's clock)")
    seconds: float = Field(description="how long the whole benchmark took")
    request: int = Field(
        default=0, description="the bench request (POST /v1/workers/bench) it answers; 0: the one at start"
    )


class NodeInfo(BaseModel):
    """What a worker node advertises in its heartbeat."""

    name: str
    classes: list[ResourceClass]
    express_slots: dict[str, int] = Field(
        default_factory=dict, description="per class: slots that serve only interactive work (the express lane)"
    )
    cores: int
    memory_total: int
    memory_available: int
    cpu_percent: float
    plugins: list[str]
    gpus: list[str] = Field(default_factory=list)
    gpu_usage: list[dict[str, float | str]] = Field(default_factory=list)
    models_available: list[str] = Field(default_factory=list, description="models this box can serve")
    models_loaded: list[str] = Field(default_factory=list, description="models warm in a worker process")
    started_at: float
    heartbeat_at: float
    version: str
    metrics_url: str | None = Field(default=None, description="where other boxes scrape this node (never 0.0.0.0)")
    bench: NodeBench | None = Field(default=None, description="the last benchmark; null until the first one ends")
    bench_running: bool = Field(default=False, description="a benchmark is running now")
    slots: dict[str, int] = Field(default_factory=dict, description="per class: slots for all work (express excluded)")
    busy: dict[str, int] = Field(default_factory=dict, description="per class: subtasks running at this heartbeat")


class ErrorItem(BaseModel):
    field: str
    reason: str


class SchedulerWeightsChange(BaseModel):
    """`PUT /v1/scheduler/weights`: change some release-scheduler weights (see `edgefleet.scheduling.priority`)."""

    model_config = ConfigDict(extra="forbid")

    weights: dict[str, StrictFloat] = Field(min_length=1, description="weight name -> new value; others keep theirs")
    reason: str = Field(min_length=1, max_length=200, description="logged and listed in GET /v1/scheduler")


class ErrorBody(BaseModel):
    error: str
    detail: list[ErrorItem]


class GcRequest(_Strict):
    """`POST /v1/admin/gc`: delete finished jobs now rather than at the next periodic sweep."""

    older_than: float | None = Field(
        default=None,
        ge=0,
        strict=True,
        description="seconds since a job finished; default: the router's retention (EDGEFLEET_JOB_RETENTION)",
    )
    limit: int = Field(default=500, ge=1, le=5000, strict=True, description="jobs deleted by this call at most")


class GcResult(BaseModel):
    removed: list[str] = Field(description="ids of the jobs deleted by this call")
    remaining: int = Field(description="finished jobs older than `older_than` still left (call again)")
    older_than: float
