"""The `plugins/<name>/plugin.yaml` manifest: its model and a loader with clear errors.

A manifest is read by both the router (to plan and validate steps) and the
workers (to advertise and run plugins), so every problem is reported as one
`ManifestError` naming the file, the dotted field and the reason: a bad plugin
must be easy to fix and must never take the good ones down with it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from edgefleet.schemas import ResourceClass

MANIFEST_FILENAME = "plugin.yaml"
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
ENTRY_POINT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*:[A-Za-z_][A-Za-z0-9_]*$"
# Manifests are small; a cap keeps a stray huge file from stalling a worker's start.
MAX_MANIFEST_BYTES = 1024 * 1024

ActionName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]


class ManifestError(Exception):
    """A manifest (or workflow template file) that cannot be used.

    `field` and `reason` describe the first problem; `details` holds every
    (field, reason) pair found, so one fix-and-retry round fixes them all.
    """

    def __init__(
        self,
        file: str,
        field: str,
        reason: str,
        details: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        self.file = file
        self.field = field
        self.reason = reason
        self.details: list[tuple[str, str]] = list(details) if details else [(field, reason)]
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.file}: " + "; ".join(f"{f}: {r}" for f, r in self.details)

    def as_dict(self) -> dict[str, str]:
        """A JSON-friendly form, e.g. for GET /v1/plugins or a CLI listing."""
        return {"file": self.file, "field": self.field, "reason": self.reason, "message": str(self)}


def _check_json_schema(value: dict[str, Any]) -> dict[str, Any]:
    try:
        Draft202012Validator.check_schema(value)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise ValueError(
            f"not a valid JSON Schema (draft 2020-12): {exc.message}" + (f" at {where}" if where else "")
        ) from None
    return value


class ActionSpec(BaseModel):
    """One action of a plugin; `input_schema` describes the step's `args` object."""

    # Extra keys are refused so that a typo such as `input_shema` is not silently ignored.
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    output_schema: dict[str, Any] | None = None
    model_task: str | None = Field(
        default=None,
        pattern=r"^[a-z][a-z0-9_]{0,63}$",
        description="the model task type this action asks ctx.model for; steps go to a box with it warm",
    )

    @field_validator("input_schema")
    @classmethod
    def _input_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_json_schema(value)
        # `args` is always a JSON object, so a schema for anything else could never pass.
        if "type" in value and value["type"] != "object":
            raise ValueError("an input schema describes the args object: its type must be 'object'")
        return value

    @field_validator("output_schema")
    @classmethod
    def _output_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else _check_json_schema(value)


class Permission(str, Enum):
    """What a plugin may do beyond computing on its inputs in its own workspace."""

    file_system_read = "file_system_read"  # read the whole file system, not just its inputs
    file_system_write = "file_system_write"  # write to the operator's shared dirs, not just the workspace
    network = "network"  # the internet; never the host, link-local or private addresses (under bwrap)
    network_lan = "network_lan"  # also private addresses (a NAS, a printer), where an operator allows it
    gpu_access = "gpu_access"
    subprocess = "subprocess"


class Isolation(str, Enum):
    """How the worker runs the plugin's subtasks (its sandbox's limits hold either way)."""

    # A sandboxed executor serves several subtasks of one plugin version, permission set and
    # tenant in a row, each in a process forked from it after the plugin's import, in a fresh
    # workspace: module globals, /tmp and the workspace of one subtask never reach the next.
    executor = "executor"
    # A fresh sandboxed process per attempt: for plugins whose import (not each call) keeps
    # state that must not outlive one subtask (a model loaded for one tenant's settings, a
    # cache filled at import time from the first caller's data).
    per_attempt = "per_attempt"
    # Like `executor`, but the subtasks run in the executor's own process, one after another, so
    # module globals persist between them: for plugins that keep none that matter (a pure
    # function of its arguments and files), where the fork is most of a short subtask's cost.
    # Workspace, /tmp, processes and threads of one subtask still never reach the next; only
    # under bubblewrap (elsewhere it runs as `executor`). See workers/sandbox_shared.py.
    shared = "shared"


ANY_VERSION = ("", "*")  # "*" is accepted as "any version", as in other package managers


def _check_specifier(value: str) -> str:
    if value.strip() in ANY_VERSION:
        return value.strip()
    try:
        SpecifierSet(value)
    except InvalidSpecifier:
        raise ValueError(f"{value!r} is not a version range (e.g. '>=1.0,<2', or '*' for any)") from None
    return value


VersionRange = Annotated[str, AfterValidator(_check_specifier)]


def _check_requirement(value: str) -> str:
    try:
        Requirement(value)
    except InvalidRequirement as exc:
        raise ValueError(f"{value!r} is not a package requirement (e.g. 'Pillow>=10'): {exc}") from None
    return value


class Dependencies(BaseModel):
    """What the box must have for the plugin to run there."""

    model_config = ConfigDict(extra="forbid")

    python: list[Annotated[str, AfterValidator(_check_requirement)]] = Field(default_factory=list)
    binaries: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")]] = Field(
        default_factory=list
    )


class Requires(BaseModel):
    model_config = ConfigDict(extra="forbid")

    edgefleet: VersionRange | None = None
    plugins: dict[Annotated[str, StringConstraints(pattern=NAME_PATTERN)], VersionRange] = Field(default_factory=dict)


class Limits(BaseModel):
    """Enforced by the sandbox on every attempt (a step's own timeout may be shorter)."""

    model_config = ConfigDict(extra="forbid")

    timeout: float = Field(default=300.0, gt=0, le=86400, description="wall-clock seconds")
    memory_mb: int = Field(default=1024, ge=16, le=1_048_576, description="address space")
    cpu_seconds: int = Field(default=300, ge=1, le=86400)
    max_file_mb: int = Field(default=1024, ge=1, le=1_048_576, description="largest file it may write")
    max_processes: int = Field(default=32, ge=1, le=4096, description="only with the subprocess permission")
    workspace_mb: int = Field(default=4096, ge=1, le=1_048_576, description="disk its workspace may use")


class PluginManifest(BaseModel):
    """The validated content of one `plugin.yaml`."""

    model_config = ConfigDict(extra="forbid")

    # `plugin_name` is accepted as a synonym (the product brief's spelling); `name` is canonical.
    name: str = Field(pattern=NAME_PATTERN, validation_alias=AliasChoices("name", "plugin_name"))
    version: str
    description: str = ""
    entry_point: str = Field(
        pattern=ENTRY_POINT_PATTERN,
        description="module:function; the module is a .py file in the plugin folder",
    )
    resource_class: ResourceClass
    actions: dict[ActionName, ActionSpec] = Field(min_length=1)
    dependencies: Dependencies = Field(default_factory=Dependencies)
    requires: Requires = Field(default_factory=Requires)
    permissions: list[Permission] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    isolation: Isolation = Field(
        default=Isolation.executor,
        description="executor: reused for later subtasks, a process forked per subtask; "
        "shared: reused, subtasks in its own process (module globals persist); per_attempt: never",
    )

    def allows(self, permission: Permission) -> bool:
        return permission in self.permissions

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        # YAML reads `version: 1.10` as the float 1.1; say so instead of guessing.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ValueError(f'write the version as a quoted string, e.g. version: "{value}"')
        if isinstance(value, str):
            try:
                Version(value)
            except InvalidVersion:
                raise ValueError(f"{value!r} is not a valid version (PEP 440, e.g. 1.0.0)") from None
        return value

    @property
    def entry_module(self) -> str:
        return self.entry_point.split(":", 1)[0]

    @property
    def entry_function(self) -> str:
        return self.entry_point.split(":", 1)[1]

    @property
    def parsed_version(self) -> Version:
        return Version(self.version)


def format_loc(loc: Sequence[int | str]) -> str:
    """Pydantic's error location as a dotted path: ('actions', 'count', 'input_schema')."""
    return ".".join(str(part) for part in loc) or "(root)"


def _reason(msg: str) -> str:
    # Our own validators' messages arrive as "Value error, ..."; the prefix is noise.
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def validation_details(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """Every pydantic error as a (dotted field, reason) pair."""
    details = []
    for err in exc.errors(include_url=False):
        field = format_loc(err["loc"])
        if prefix:
            field = prefix if field == "(root)" else f"{prefix}.{field}"
        reason = _reason(err["msg"])
        if err.get("type") in ("enum", "literal_error") and isinstance(err.get("input"), (str, int, float)):
            # Name the offending value: "'telepathy' is not allowed; input should be 'network', ...".
            reason = f"{err['input']!r} is not allowed; {reason[:1].lower()}{reason[1:]}"
        details.append((field, reason))
    return details


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; any problem becomes a ManifestError."""
    file = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(file, "(file)", f"too large ({size} bytes, at most {MAX_MANIFEST_BYTES})")
        text = path.read_text(encoding="utf-8")
    except ManifestError:
        raise
    except UnicodeDecodeError as exc:
        raise ManifestError(file, "(file)", f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except OSError as exc:
        raise ManifestError(file, "(file)", f"cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ManifestError(file, "(yaml)", f"invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise ManifestError(file, "(root)", f"must be a mapping of fields, got {got}")
    return data


def load_manifest(path: Path) -> PluginManifest:
    """Load and validate `path` (a plugin.yaml); raise ManifestError on any problem.

    Beyond the model, it checks what only the file's place can tell: the folder
    is named after the plugin and the entry module exists next to the manifest.
    """
    path = Path(path)
    file = str(path)
    data = read_yaml_mapping(path)
    try:
        manifest = PluginManifest.model_validate(data)
    except ValidationError as exc:
        invalid = validation_details(exc)
        raise ManifestError(file, invalid[0][0], invalid[0][1], invalid) from None

    details: list[tuple[str, str]] = []
    folder = path.parent
    if folder.name != manifest.name:
        details.append(("name", f"must equal the plugin's folder name {folder.name!r}"))
    module_file = folder / f"{manifest.entry_module}.py"
    if not module_file.is_file():
        details.append(("entry_point", f"module file {module_file.name!r} not found in {folder}"))
    if details:
        raise ManifestError(file, details[0][0], details[0][1], details)
    return manifest


def is_valid_name(name: str) -> bool:
    """Whether `name` is usable as a plugin or action name."""
    return re.fullmatch(NAME_PATTERN, name) is not None
