"""Workflow templates: named, parameterised step lists in `<plugin dir>/workflows/*.yaml`.

A client submits `{"template": "text-report", "inputs": {...}}` instead of
writing steps; `TemplateCatalog.expand` checks the inputs and substitutes them
into the template's raw steps, which the planner then validates like any
explicit plan. Broken template files are recorded in `errors`, never raised,
so one bad file does not hide the others.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgefleet.plugin_manifest import ManifestError, read_yaml_mapping, validation_details
from edgefleet.refs import is_artifact

TEMPLATE_NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,127}$"
INPUT_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
WORKFLOWS_SUBDIR = "workflows"
# `${inputs.NAME}`; a string that is exactly one placeholder keeps the input's type.
PLACEHOLDER = re.compile(r"\$\{inputs\.([A-Za-z_][A-Za-z0-9_]*)\}")

# What an input takes over from the argument it feeds (see `WorkflowTemplate.input_schema`).
_CONSTRAINT_KEYWORDS = (
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "items",
    "minItems",
    "maxItems",
)

InputType = Literal["string", "number", "integer", "boolean", "object", "array"]


def _type_matches(kind: str, value: Any) -> bool:
    # bool is an int in Python but not a number in JSON Schema terms.
    if kind == "string":
        # An uploaded file or folder, `{"$artifact": id}`, is a path (a string) when the step runs.
        return isinstance(value, str) or is_artifact(value)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    return False


class TemplateError(Exception):
    """Bad use of a template: `field` is `template` or `inputs.<name>`."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class TemplateInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: InputType
    required: bool = True
    default: Any = None
    description: str = ""

    @model_validator(mode="after")
    def _default_has_type(self) -> TemplateInput:
        if self.default is not None and not _type_matches(self.type, self.default):
            raise ValueError(f"default {self.default!r} is not of type {self.type}")
        return self


class WorkflowTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=TEMPLATE_NAME_PATTERN)
    description: str = ""
    inputs: dict[str, TemplateInput] = Field(default_factory=dict)
    steps: list[dict[str, Any]] = Field(min_length=1, max_length=500)

    @field_validator("inputs")
    @classmethod
    def _input_names(cls, value: dict[str, TemplateInput]) -> dict[str, TemplateInput]:
        for name in value:
            if not INPUT_NAME_PATTERN.match(name):
                raise ValueError(f"input name {name!r} must use letters, digits and '_' (not first)")
        return value

    @model_validator(mode="after")
    def _steps_consistent(self) -> WorkflowTemplate:
        # The planner validates steps fully; here only what a template author
        # can get wrong that the planner would report confusingly later.
        seen: set[str] = set()
        for i, step in enumerate(self.steps):
            step_id = step.get("id")
            if not isinstance(step_id, str) or not step_id:
                raise ValueError(f"steps[{i}] needs a string 'id'")
            if step_id in seen:
                raise ValueError(f"steps[{i}]: duplicate step id {step_id!r}")
            seen.add(step_id)
        undeclared = sorted(_placeholders(self.steps) - set(self.inputs))
        if undeclared:
            raise ValueError(f"steps use undeclared inputs: {', '.join(undeclared)}")
        return self

    def resolve_inputs(self, given: dict[str, Any]) -> dict[str, Any]:
        """Check `given` against the declared inputs; fill in defaults."""
        if not isinstance(given, dict):
            raise TemplateError("inputs", "must be an object")
        unknown = sorted(set(given) - set(self.inputs))
        if unknown:
            allowed = ", ".join(sorted(self.inputs)) or "no inputs"
            raise TemplateError(f"inputs.{unknown[0]}", f"unknown input; template {self.name!r} takes: {allowed}")
        values: dict[str, Any] = {}
        for name, spec in self.inputs.items():
            if name in given and given[name] is not None:
                value = given[name]
                if not _type_matches(spec.type, value):
                    raise TemplateError(f"inputs.{name}", f"must be of type {spec.type}, got {type(value).__name__}")
                values[name] = value
            elif spec.default is not None:
                values[name] = copy.deepcopy(spec.default)
            elif spec.required:
                raise TemplateError(f"inputs.{name}", "is required")
            else:
                values[name] = None
        return values

    def expand(self, given: dict[str, Any]) -> list[dict[str, Any]]:
        """The template's steps with every `${inputs.NAME}` substituted.

        A string that is exactly one placeholder takes the input's value with
        its type; inside a longer string the value is inserted as text. An
        optional input given no value and no default removes a mapping key
        that is exactly its placeholder, and reads as "" inside a string.
        """
        values = self.resolve_inputs(given)
        return cast(list[dict[str, Any]], _substitute(copy.deepcopy(self.steps), values))

    def input_schema(self, arg_schema: Callable[[str, str, str], dict[str, Any] | None]) -> dict[str, Any]:
        """A JSON schema of the inputs, each with the constraints of the step argument it feeds.

        An input whose placeholder is a whole argument value (`op: "${inputs.op}"`) takes that
        argument's enum, pattern, bounds and items, so a model planning with the template is held
        to what the step will accept. `arg_schema(plugin, action, arg)` gives an argument's schema
        (None when unknown).
        """
        properties: dict[str, Any] = {}
        for name, spec in self.inputs.items():
            schema: dict[str, Any] = {"type": spec.type}
            if spec.description:
                schema["description"] = spec.description
            # An input fed to several arguments must satisfy all of them: their constraints add up
            # (on a conflict the first step's wins; the real validation still checks every step).
            for plugin, action, arg in self._fed_arguments(name):
                fed = arg_schema(plugin, action, arg)
                if not isinstance(fed, dict):
                    continue
                for key, value in fed.items():
                    if key not in _CONSTRAINT_KEYWORDS:
                        continue
                    if key not in schema:
                        schema[key] = copy.deepcopy(value)
                    elif isinstance(schema[key], dict) and isinstance(value, dict):
                        schema[key] = {**copy.deepcopy(value), **schema[key]}
            properties[name] = schema
        required = [n for n, spec in self.inputs.items() if spec.required and spec.default is None]
        return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}

    def _fed_arguments(self, name: str) -> list[tuple[str, str, str]]:
        whole = f"${{inputs.{name}}}"
        return [
            (str(step.get("plugin")), str(step.get("action")), arg)
            for step in self.steps
            for arg, value in (step.get("args") or {}).items()
            if value == whole
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "inputs": {name: spec.model_dump() for name, spec in self.inputs.items()},
            "steps": copy.deepcopy(self.steps),
        }


def _placeholders(value: Any) -> set[str]:
    if isinstance(value, str):
        return set(PLACEHOLDER.findall(value))
    if isinstance(value, dict):
        return set().union(*(_placeholders(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_placeholders(v) for v in value)) if value else set()
    return set()


def _substitute(value: Any, values: dict[str, Any]) -> Any:
    if isinstance(value, str):
        whole = PLACEHOLDER.fullmatch(value)
        if whole:
            return copy.deepcopy(values[whole.group(1)])
        # Inside a longer string an absent optional input reads as "".
        return PLACEHOLDER.sub(lambda m: "" if values[m.group(1)] is None else str(values[m.group(1)]), value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            whole = PLACEHOLDER.fullmatch(v) if isinstance(v, str) else None
            if whole and values[whole.group(1)] is None:
                continue  # an absent optional input drops its key, so the step's own default applies
            out[k] = _substitute(v, values)
        return out
    if isinstance(value, list):
        return [_substitute(v, values) for v in value]
    return value


def load_template(path: Path) -> WorkflowTemplate:
    """Load one template file; raise ManifestError (file, field, reason) on any problem."""
    path = Path(path)
    data = read_yaml_mapping(path)
    try:
        template = WorkflowTemplate.model_validate(data)
    except ValidationError as exc:
        details = validation_details(exc)
        raise ManifestError(str(path), details[0][0], details[0][1], details) from None
    if template.name != path.stem:
        raise ManifestError(str(path), "name", f"must equal the file name {path.stem!r}")
    return template


class TemplateCatalog:
    """Templates by name, plus the errors met while loading them."""

    def __init__(
        self,
        templates: dict[str, WorkflowTemplate] | None = None,
        errors: list[ManifestError] | None = None,
    ) -> None:
        self._templates: dict[str, WorkflowTemplate] = dict(templates or {})
        self.errors: list[ManifestError] = list(errors or [])

    @classmethod
    def load(cls, dirs: Iterable[Path]) -> TemplateCatalog:
        """Load `<dir>/workflows/*.yaml` (and *.yml) for each plugin dir; the first dir wins a name."""
        catalog = cls()
        for base in dirs:
            folder = Path(base) / WORKFLOWS_SUBDIR
            if not folder.is_dir():
                continue  # a plugin dir without templates is normal
            files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
            for path in files:
                try:
                    template = load_template(path)
                except ManifestError as exc:
                    catalog.errors.append(exc)
                    continue
                if template.name in catalog._templates:
                    catalog.errors.append(
                        ManifestError(str(path), "name", f"template {template.name!r} is already defined; ignored")
                    )
                    continue
                catalog._templates[template.name] = template
        return catalog

    def __contains__(self, name: object) -> bool:
        return name in self._templates

    def get(self, name: str) -> WorkflowTemplate | None:
        return self._templates.get(name)

    def names(self) -> list[str]:
        return sorted(self._templates)

    def describe(self) -> list[dict[str, Any]]:
        """JSON-ready list for a GET /v1/templates endpoint, sorted by name."""
        return [self._templates[name].describe() for name in self.names()]

    def expand(self, name: str, inputs: dict[str, Any]) -> list[dict[str, Any]]:
        """Raw step dicts for template `name` with `inputs` substituted; TemplateError if not possible."""
        template = self._templates.get(name)
        if template is None:
            known = ", ".join(self.names()) or "none"
            raise TemplateError("template", f"unknown template {name!r} (known: {known})")
        return template.expand(inputs)
