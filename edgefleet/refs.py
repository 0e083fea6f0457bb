"""References from a step's args to earlier steps' outputs.

Syntax: any JSON value `{"$ref": "steps.<step id>.output[.<key or index>...]"}`,
anywhere inside `args`. A reference is replaced by that part of the referenced
step's output when the subtask starts; referencing a step adds it to `needs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

REF_KEY = "$ref"


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


def find_refs(args: dict[str, Any], base: str = "args") -> list[Ref]:
    found: list[Ref] = []

    def walk(value: Any, field: str) -> None:
        if is_ref(value):
            found.append(parse_ref(value[REF_KEY], field))
        elif isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, f"{field}.{key}")
        elif isinstance(value, list):
            for index, inner in enumerate(value):
                walk(inner, f"{field}.{index}")

    walk(args, base)
    return found


def top_level_keys_with_refs(args: dict[str, Any]) -> set[str]:
    return {ref.field.split(".")[1] for ref in find_refs(args)}


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

    def walk(value: Any, field: str) -> Any:
        if is_ref(value):
            ref = parse_ref(value[REF_KEY], field)
            if ref.step not in outputs:
                raise RefError(field, f"step {ref.step!r} has no output")
            return _lookup(outputs[ref.step], ref)
        if isinstance(value, dict):
            return {k: walk(v, f"{field}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{field}.{i}") for i, v in enumerate(value)]
        return value

    return cast(dict[str, Any], walk(args, "args"))
