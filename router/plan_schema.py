"""The JSON schema a planning model's answer is held to, and the answer decoded back into a plan.

The schema is written for llama.cpp's JSON-schema-to-grammar converter (`llama_cpp.llama_grammar`),
which turns it into the grammar that constrains generation (in-process and in llama_cpp.server):

* one alternative per shortlisted template (`{"template", "inputs"}`, inputs with the constraints of
  the arguments they feed), one `{"steps": [...]}` over the shortlisted actions, and `{"refuse": reason}`;
  the converter's `anyOf` is a plain grammar alternation, so no branch is forced on the model;
* a step may take any argument from an earlier step as `{"ref": "steps.<id>.output.<key>"}`; the
  converter reads a `"$ref"` key as a schema reference, so the answer spells it `ref` and `decode`
  turns it into the `{"$ref": ...}` the planner knows;
* an action's "one of these groups of arguments" (`oneOf` of `required`) becomes one alternative per group;
* patterns are anchored (the converter rejects unanchored ones and then falls back to free-form JSON),
  and a pattern that only checks a prefix may be followed by any characters but a quote or backslash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from edgefleet.plugin_catalog import PluginCatalog
from edgefleet.templates import TemplateCatalog

MAX_GOAL_STEPS = 4
REF_KEY = "ref"
STEP_ID_PATTERN = "^[a-z][a-z0-9_]{0,11}$"  # bounded: a small model may otherwise ramble inside an id
REFUSE_MAX = 200
# A refusal's length in the grammar: a small model that starts one must also end it.
REFUSE_GRAMMAR_MAX = 80
# The keywords the grammar uses; everything else is checked by the real validation afterwards.
_KEPT = ("type", "enum", "const", "pattern", "minLength", "maxLength", "minItems", "maxItems")
# The converter spells a bound out as nested optional rules, one per unit: a maxLength of 8192
# makes a grammar of megabytes. Larger bounds are left to the validation after generation.
_MAX_GRAMMAR_BOUND = {"minLength": 4, "maxLength": 64, "minItems": 4, "maxItems": 16}
_REF_VALUE = re.compile(r"^steps\.[a-z][a-z0-9_]{0,15}\.output(\.[A-Za-z0-9_]+)*$")
_REST = '[^"\\\\]*'  # any characters that keep the JSON string open


_CLASS_ESCAPES = {"s": " \\t\\n\\r", "d": "0-9", "w": "A-Za-z0-9_"}
_PLAIN_PUNCTUATION = frozenset("./+*?(){}|$@#:,=!<>&%~'\"")


def _plain_classes(pattern: str) -> str:
    """`\\s`, `\\d`, `\\w` spelled out: llama.cpp's grammar parser knows no class escapes."""
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            if nxt in _CLASS_ESCAPES:
                spelled = _CLASS_ESCAPES[nxt]
                out.append(spelled if in_class else f"[{spelled}]")
            elif nxt in _PLAIN_PUNCTUATION:
                # An escaped literal: the grammar's strings know only \\n-style escapes.
                out.append(nxt if in_class else f"[{nxt}]")
            else:
                out.append(pattern[i : i + 2])
            i += 2
            continue
        if char == "[" and not in_class:
            in_class = True
        elif char == "]" and in_class:
            in_class = False
        out.append(char)
        i += 1
    return "".join(out)


def anchored(pattern: str) -> str:
    """`pattern` as the converter needs it: starting with ^ and ending with $, without class escapes."""
    pattern = _plain_classes(pattern)
    if not pattern.startswith("^"):
        pattern = "^" + _REST + pattern
    if not pattern.endswith("$") or pattern.endswith("\\$"):
        pattern = pattern + _REST + "$"
    return pattern


def _from_goal(schema: dict[str, Any], options: list[str]) -> list[str]:
    """The goal's strings a free-text string argument may take (those its pattern accepts)."""
    pattern = schema.get("pattern")
    if not isinstance(pattern, str):
        return options
    try:
        compiled = re.compile(pattern)
    except re.error:
        return []
    return [o for o in options if compiled.search(o)]


def grammar_value(schema: Any, options: list[str] | None = None) -> dict[str, Any]:
    """One argument's schema reduced to what the grammar enforces.

    With `options` (strings taken from the goal), a plain string argument may only be one of them:
    a small model then cannot invent a path or loop inside an open string until its tokens run out.
    An argument none of the options fits keeps its own schema (and the trust check looks at it).
    """
    if not isinstance(schema, dict):
        return {}
    if options and schema.get("type") == "string" and "enum" not in schema and "const" not in schema:
        fitting = _from_goal(schema, options)
        if fitting:
            return {"enum": fitting}
    out: dict[str, Any] = {k: schema[k] for k in _KEPT if k in schema}
    for key, bound in _MAX_GRAMMAR_BOUND.items():
        if isinstance(out.get(key), int) and out[key] > bound:
            del out[key]
    if isinstance(out.get("type"), list):
        out.pop("pattern", None)  # the converter drops a pattern on a union of types anyway
    if "pattern" in out:
        out["pattern"] = anchored(str(out["pattern"]))
    if isinstance(schema.get("items"), dict):
        out["items"] = grammar_value(schema["items"], options)
    props = schema.get("properties")
    if isinstance(props, dict) and props:
        out["properties"] = {k: grammar_value(v, options) for k, v in props.items()}
        if isinstance(schema.get("required"), list):
            out["required"] = list(schema["required"])
    if out.get("type") == "object" and "properties" not in out:
        out = {"type": "object"}  # a free object: the converter's generic one
    return out


def ref_schema(output_keys: list[str]) -> dict[str, Any]:
    keys = "|".join(sorted(set(output_keys)))
    tail = f"(\\.({keys}))?" if keys else "(\\.[A-Za-z0-9_]+)?"
    return {
        "type": "object",
        "properties": {REF_KEY: {"type": "string", "pattern": anchored(f"^steps\\.[a-z][a-z0-9_]*\\.output{tail}$")}},
        "required": [REF_KEY],
        "additionalProperties": False,
    }


def _groups(schema: dict[str, Any]) -> list[list[str]]:
    """The `required` groups of a top-level oneOf/anyOf ("give text or path"), [] when none."""
    choices = schema.get("oneOf") or schema.get("anyOf")
    if not isinstance(choices, list):
        return []
    groups = [c["required"] for c in choices if isinstance(c, dict) and isinstance(c.get("required"), list)]
    return groups if len(groups) == len(choices) else []


def args_alternatives(
    input_schema: dict[str, Any], ref: dict[str, Any], options: list[str] | None = None
) -> list[dict[str, Any]]:
    """The args object, one alternative per argument group; every argument may be a step reference."""
    props: dict[str, Any] = dict(input_schema.get("properties") or {})
    required = [r for r in input_schema.get("required") or [] if r in props]
    groups = _groups(input_schema) or [[]]
    grouped = {name for g in groups for name in g}
    out = []
    for group in groups:
        names = [n for n in props if n not in grouped or n in group]
        out.append(
            {
                "type": "object",
                "properties": {n: {"anyOf": [grammar_value(props[n], options), ref]} for n in names},
                "required": list(dict.fromkeys([*required, *group])),
                "additionalProperties": False,
            }
        )
    return out


def template_inputs(templates: TemplateCatalog, plugins: PluginCatalog, name: str) -> dict[str, Any] | None:
    """The inputs schema of template `name`, each input with the constraints of the argument it feeds."""
    template = templates.get(name)
    if template is None:
        return None

    def arg_schema(plugin: str, action: str, arg: str) -> dict[str, Any] | None:
        found = plugins.get(plugin)
        spec = found.manifest.actions.get(action) if found else None
        props = spec.input_schema.get("properties") if spec else None
        return props.get(arg) if isinstance(props, dict) else None

    return template.input_schema(arg_schema)


def template_schema(
    templates: TemplateCatalog, plugins: PluginCatalog, name: str, options: list[str] | None = None
) -> dict[str, Any] | None:
    inputs = template_inputs(templates, plugins, name)
    if inputs is None:
        return None
    inputs["properties"] = {k: grammar_value(v, options) for k, v in inputs["properties"].items()}
    return {
        "type": "object",
        "properties": {"template": {"const": name}, "inputs": inputs},
        "required": ["template", "inputs"],
        "additionalProperties": False,
    }


def output_keys(plugins: PluginCatalog, actions: list[tuple[str, str]]) -> list[str]:
    keys: list[str] = []
    for plugin_name, action_name in actions:
        plugin = plugins.get(plugin_name)
        action = plugin.manifest.actions.get(action_name) if plugin else None
        props = (action.output_schema or {}).get("properties") if action else None
        if isinstance(props, dict):
            keys += [k for k in props if re.fullmatch(r"[A-Za-z0-9_]+", k)]
    return keys


def plan_schema(
    plugins: PluginCatalog,
    templates: TemplateCatalog,
    template_names: list[str],
    actions: list[tuple[str, str]],
    options: list[str] | None = None,
) -> dict[str, Any]:
    """The answer's schema for these candidates: a template, steps over these actions, or a refusal.

    `options`: the strings a plain string argument may take (see `goal_options`); None leaves them free.
    """
    alternatives: list[dict[str, Any]] = []
    for name in template_names:
        schema = template_schema(templates, plugins, name, options)
        if schema is not None:
            alternatives.append(schema)
    ref = ref_schema(output_keys(plugins, actions))
    step_alternatives = []
    for plugin_name, action_name in actions:
        plugin = plugins.get(plugin_name)
        action = plugin.manifest.actions.get(action_name) if plugin else None
        if action is None:
            continue
        for args in args_alternatives(action.input_schema, ref, options):
            step_alternatives.append(
                {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "pattern": STEP_ID_PATTERN},
                        "plugin": {"const": plugin_name},
                        "action": {"const": action_name},
                        "args": args,
                    },
                    "required": ["id", "plugin", "action", "args"],
                    "additionalProperties": False,
                }
            )
    if step_alternatives:
        alternatives.append(
            {
                "type": "object",
                "properties": {
                    "steps": {
                        "type": "array",
                        "items": {"anyOf": step_alternatives},
                        "minItems": 1,
                        "maxItems": MAX_GOAL_STEPS,
                    }
                },
                "required": ["steps"],
                "additionalProperties": False,
            }
        )
    alternatives.append(
        {
            "type": "object",
            "properties": {"refuse": {"type": "string", "minLength": 1, "maxLength": REFUSE_GRAMMAR_MAX}},
            "required": ["refuse"],
            "additionalProperties": False,
        }
    )
    return {"anyOf": alternatives}


_WORDS = re.compile(r"[A-Za-z][A-Za-z0-9_-]{2,}")


def goal_options(goal: str, values: list[str]) -> list[str]:
    """What a plain string argument may be: the goal's own values (URLs, paths, quoted text), the
    goal itself (a prompt or question), and its words (a label, a branch), longest first."""
    words = [w for w in _WORDS.findall(goal) if w not in values]
    options = [*values, " ".join(goal.split()), *words]
    # The converter spells a quote or backslash inside a constant so that the grammar breaks:
    # such a value stays out (its argument keeps a free string, checked afterwards).
    return [o for o in dict.fromkeys(options) if o and len(o) <= 2000 and '"' not in o and "\\" not in o]


# --- the answer, decoded ----------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """A decoded model answer: exactly one of `refuse`, `template` or `steps` is set."""

    refuse: str | None = None
    template: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] | None = None

    def plan_body(self) -> dict[str, Any]:
        """What a client would submit to run it as is: `{"template", "inputs"}` or `{"steps"}`."""
        if self.template is not None:
            return {"template": self.template, "inputs": self.inputs}
        return {"steps": self.steps or []}


class AnswerError(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def decode_refs(value: Any) -> Any:
    """`{"ref": "steps.x.output.k"}` anywhere in `value` becomes `{"$ref": "steps.x.output.k"}`."""
    if isinstance(value, dict):
        if set(value) == {REF_KEY} and isinstance(value[REF_KEY], str) and _REF_VALUE.match(value[REF_KEY]):
            return {"$ref": value[REF_KEY]}
        return {k: decode_refs(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_refs(v) for v in value]
    return value


def decode(data: Any) -> Answer:
    """The parsed JSON answer as an `Answer`; `AnswerError` when it has none of the three shapes."""
    if not isinstance(data, dict):
        raise AnswerError("plan", "must be a JSON object")
    shapes = [k for k in ("refuse", "template", "steps") if k in data]
    if len(shapes) != 1:
        raise AnswerError("plan", "must have exactly one of 'refuse', 'template' or 'steps'")
    if "refuse" in data:
        reason = data["refuse"]
        if not isinstance(reason, str) or not reason.strip():
            raise AnswerError("plan.refuse", "must be a non-empty reason")
        return Answer(refuse=" ".join(reason.split())[:REFUSE_MAX])
    if "template" in data:
        inputs = data.get("inputs", {})
        if not isinstance(data["template"], str) or not isinstance(inputs, dict):
            raise AnswerError("plan", "a template plan is {'template': name, 'inputs': {...}}")
        return Answer(template=data["template"], inputs=inputs)
    steps = data["steps"]
    if not isinstance(steps, list) or not steps:
        raise AnswerError("plan.steps", "must be a non-empty list")
    if len(steps) > MAX_GOAL_STEPS:
        raise AnswerError("plan.steps", f"at most {MAX_GOAL_STEPS} steps")
    return Answer(steps=[decode_refs(s) for s in steps])
