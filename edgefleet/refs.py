"""References from a step's args to earlier steps' outputs, and to uploaded artifacts.

Syntax: any JSON value `{"$ref": "steps.<step id>.output[.<key or index>...]"}`,
anywhere inside `args`. A reference is replaced by that part of the referenced
step's output when the subtask starts; referencing a step adds it to `needs`.

`{"$artifact": "<id>"}` (the sha256 that `POST /v1/artifacts` answered) is replaced
by the path of the artifact's local copy on the box that runs the step: a file, or
for a folder (kind `tree`) a folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

REF_KEY = "$ref"
ARTIFACT_KEY = "$artifact"


class RefError(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Ref:
    field: str  # where it sits, e.g. "args.path"
    step: str
    path: tuple[str, ...]


def is_ref(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {REF_KEY}


def parse_ref(text: Any, field: str) -> Ref:
    if not isinstance(text, str):
        raise RefError(field, "$ref must be a string like 'steps.<id>.output.<key>'")
    parts = text.split(".")
    if len(parts) < 3 or parts[0] != "steps" or parts[2] != "output" or not parts[1]:
        raise RefError(field, f"$ref {text!r} must look like 'steps.<id>.output[.<key>...]'")
    return Ref(field=field, step=parts[1], path=tuple(parts[3:]))


def _markers(value: Any, field: str, is_marker: Callable[[Any], bool]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(field, marker) of every marker object (`$ref`, `$artifact`) inside value, through dicts and lists."""
    if is_marker(value):
        yield field, value
    elif isinstance(value, dict):
        for key, inner in value.items():
            yield from _markers(inner, f"{field}.{key}", is_marker)
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _markers(inner, f"{field}.{index}", is_marker)


def _replaced(value: Any, field: str, is_marker: Callable[[Any], bool], by: Callable[[Any, str], Any]) -> Any:
    """A copy of value with every marker object replaced by `by(marker, field)`."""
    if is_marker(value):
        return by(value, field)
    if isinstance(value, dict):
        return {k: _replaced(v, f"{field}.{k}", is_marker, by) for k, v in value.items()}
    if isinstance(value, list):
        return [_replaced(v, f"{field}.{i}", is_marker, by) for i, v in enumerate(value)]
    return value


def find_refs(args: dict[str, Any], base: str = "args") -> list[Ref]:
    return [parse_ref(marker[REF_KEY], field) for field, marker in _markers(args, base, is_ref)]


def top_level_keys_with_refs(args: dict[str, Any]) -> set[str]:
    """Args whose value is only known when the step starts (a `$ref` or an `$artifact` inside)."""
    return {ref.field.split(".")[1] for ref in find_refs(args)} | {
        field.split(".")[1] for field, _ in find_artifacts(args)
    }


def is_artifact(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {ARTIFACT_KEY}


def find_artifacts(args: Any, base: str = "args") -> list[tuple[str, str]]:
    """(field, artifact id) of every `{"$artifact": id}` inside args; a malformed one raises RefError."""
    found: list[tuple[str, str]] = []
    for field, marker in _markers(args, base, is_artifact):
        artifact_id = marker[ARTIFACT_KEY]
        if not isinstance(artifact_id, str) or not artifact_id:
            raise RefError(field, "$artifact must be the id (sha256) that POST /v1/artifacts answered")
        found.append((field, artifact_id))
    return found


def resolve_artifacts(args: dict[str, Any], local_paths: dict[str, str]) -> dict[str, Any]:
    """A copy of args with every `{"$artifact": id}` replaced by the id's local path."""

    def local(marker: dict[str, Any], field: str) -> str:
        artifact_id = marker[ARTIFACT_KEY]
        if artifact_id not in local_paths:
            raise RefError(field, f"artifact {artifact_id!r} is not on this box")
        return local_paths[artifact_id]

    return cast(dict[str, Any], _replaced(args, "args", is_artifact, local))


def _lookup(output: Any, ref: Ref) -> Any:
    value = output
    for part in ref.path:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise RefError(ref.field, f"step {ref.step!r} output has no {'.'.join(ref.path)!r}")
    return value


def resolve_refs(args: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of args with every reference replaced by the referenced output."""

    def output_of(marker: dict[str, Any], field: str) -> Any:
        ref = parse_ref(marker[REF_KEY], field)
        if ref.step not in outputs:
            raise RefError(field, f"step {ref.step!r} has no output")
        return _lookup(outputs[ref.step], ref)

    return cast(dict[str, Any], _replaced(args, "args", is_ref, output_of))
