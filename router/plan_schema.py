"""The JSON schema a planning model's answer is held to, and the answer decoded back into a plan.

The schema is written for llama.cpp's JSON-schema-to-grammar converter (`llama_cpp.llama_grammar`),
which turns it into the grammar that constrains generation (in-process and in llama_cpp.server):

* one alternative per shortlisted template (`{"template", "inputs"}`, inputs with the constraints of
  the arguments they feed), one `{"steps": [...]}` over the shortlisted actions, and `{"refuse": reason}`;
  the converter's `anyOf` is a plain grammar alternation, so no branch is forced on the model;
* step ids are fixed by position (`s1`, `s2`, ...) and a step may take any argument from an *earlier*
  step as `{"ref": "steps.<id>.output.<key>"}` (the first step none): SmolLM2-135M otherwise wrote
  duplicate ids and steps that reference themselves. The converter reads a `"$ref"` key as a schema
  reference, so the answer spells it `ref` and `decode` turns it into the `{"$ref": ...}` the planner knows;
* with the goal's facts (`GoalFacts`), an argument offers only what the goal can fill: optional
  arguments only when the goal names a value for them (a number, an enum word, a URL, a path),
  numbers only among the goal's numbers, path arguments only among the goal's paths (or a step
  reference), arrays at most as long as the goal has values; a small model that is offered many
  optional arguments loops through them until its tokens run out;
* an action's "one of these groups of arguments" (`oneOf` of `required`) becomes one alternative per group;
* patterns are anchored (the converter rejects unanchored ones and then falls back to free-form JSON),
  and a pattern that only checks a prefix may be followed by any characters but a quote or backslash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from edgefleet.plugin_catalog import PluginCatalog
from edgefleet.router.plan_candidates import query_terms, stem, terms
from edgefleet.templates import TemplateCatalog

MAX_GOAL_STEPS = 4
REF_KEY = "ref"


def step_id(index: int) -> str:
    """The id the grammar gives the step at `index` (0-based): short, unique, known before generation."""
    return f"s{index + 1}"


# An array the goal cannot fill item by item stays this short in the grammar.
_MAX_GRAMMAR_ITEMS = 4
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


@dataclass(frozen=True)
class GoalFacts:
    """What the goal itself says: the grammar offers arguments only from it.

    `values`: its concrete values (URLs, paths, quoted text, numbers; `plan_trust.goal_values`).
    """

    text: str
    values: list[str]

    @property
    def options(self) -> list[str]:
        return goal_options(self.text, self.values)

    @property
    def paths(self) -> list[str]:
        return [v for v in self.values if v.startswith("/")]

    def numbers(self, schema: dict[str, Any]) -> list[int | float]:
        """The goal's numbers this numeric schema accepts (its type, minimum and maximum)."""
        found: list[int | float] = []
        for value in self.values:
            if not re.fullmatch(r"\d+(\.\d+)?", value):
                continue
            number: int | float = float(value) if "." in value else int(value)
            if schema.get("type") == "integer" and not isinstance(number, int):
                continue
            low, high = schema.get("minimum"), schema.get("maximum")
            if isinstance(low, (int, float)) and number < low:
                continue
            if isinstance(high, (int, float)) and number > high:
                continue
            if isinstance(schema.get("exclusiveMinimum"), (int, float)) and number <= schema["exclusiveMinimum"]:
                continue
            found.append(number)
        return list(dict.fromkeys(found))

    def names_near_a_number(self, name: str, window: int = 3) -> bool:
        """Whether a word of argument `name` (or a synonym) stands within `window` words of a number
        in the goal: "the 5 sharpest" is about `best`, "800 pixels max" about `max_edge`."""
        words = self.text.split()
        wanted = set(terms(name))
        for i, word in enumerate(words):
            if re.fullmatch(r"\d+(\.\d+)?[,.;:!?)]*", word):  # "10%" is a share, not a count
                near = " ".join(words[max(0, i - window) : i + window + 1])
                if wanted & set(query_terms(near)):
                    return True
        return False

    def names_choice(self, value: Any) -> bool:
        """Whether the goal asks for enum value `value`: "reverse order" asks for reverse_words."""
        return isinstance(value, str) and names_choice(self.text, value)

    def names_word(self, word: str) -> bool:
        """Whether the goal has a word starting with `word` ("lowercase" names "lower")."""
        return re.search(r"\b" + re.escape(word.lower().replace("_", " ")), self.text.lower()) is not None


_QUOTED_TEXT = re.compile(r"'[^']*'|\"[^\"]*\"|“[^”]*”")


def goal_parts(goal: str) -> int:
    """How many things the goal asks for, at most: its clauses joined by "and", "then", commas.

    A plan with more steps than that has steps nobody asked for ("turn 'hello edge world' into all
    caps" planned as a transform and then a photo resize, because "edge" matched max_edge).
    """
    rest = _QUOTED_TEXT.sub(" ", goal)
    return 1 + len(re.findall(r"\b(?:and|then|also)\b|[,;]", rest, re.IGNORECASE))


def names_choice(goal: str, value: str) -> bool:
    """Whether `goal` names `value` or one of its synonyms ("all caps" names upper, "lowercase" lower)."""
    if re.search(r"\b" + re.escape(value.lower().replace("_", " ")), goal.lower()):
        return True
    return stem(value.lower()) in query_terms(goal)


def _is_number(schema: dict[str, Any]) -> bool:
    return schema.get("type") in ("integer", "number") and "enum" not in schema and "const" not in schema


def fillable(name: str, schema: Any, facts: GoalFacts) -> bool:
    """Whether the goal names a value for optional argument `name` (else the grammar leaves it out)."""
    if not isinstance(schema, dict):
        return False
    if "enum" in schema or "const" in schema:
        choices = schema.get("enum") or [schema.get("const")]
        return any(isinstance(c, str) and facts.names_word(c) for c in choices)
    if _is_number(schema):
        # A number the goal names goes to an argument the goal also names ("800 pixels max" to
        # max_edge), not to every numeric option that accepts it (checkpoint_every).
        return bool(facts.numbers(schema)) and facts.names_near_a_number(name)
    if schema.get("x-path"):
        return bool(_from_goal(schema, facts.paths))
    if schema.get("type") == "string" and isinstance(schema.get("pattern"), str):
        # A pattern that most of the goal's words fit (a branch name) says nothing about the goal;
        # one that a value or one or two words fit (a URL, a commit sha) is about those.
        if len(_from_goal(schema, _WORDS.findall(facts.text))) > 2:
            return False
        return bool(_from_goal(schema, facts.values) or _from_goal(schema, _WORDS.findall(facts.text)))
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        items = schema["items"]
        return isinstance(items.get("pattern"), str) and bool(_from_goal(items, facts.values))
    return False  # booleans, objects and free text: their defaults serve unless the goal says otherwise


class Unfillable(Exception):
    """A required path argument the goal names no path for, or a free object: only a step reference fills it."""


def grammar_value(schema: Any, options: list[str] | None = None, facts: GoalFacts | None = None) -> dict[str, Any]:
    """One argument's schema reduced to what the grammar enforces.

    With `options` (strings taken from the goal), a plain string argument may only be one of them:
    a small model then cannot invent a path or loop inside an open string until its tokens run out.
    An argument none of the options fits keeps its own schema (and the trust check looks at it).
    With `facts`, numbers are the goal's numbers and paths its paths (`Unfillable` when it names none).
    """
    if not isinstance(schema, dict):
        return {}
    if facts is not None and schema.get("type") == "object" and not schema.get("properties"):
        raise Unfillable()  # a free object (a step's report) comes from an earlier step, not from the goal
    if facts is not None and schema.get("x-path"):
        paths = _from_goal(schema, facts.paths)
        if not paths:
            raise Unfillable()
        return {"enum": paths}
    if facts is not None and _is_number(schema) and (numbers := facts.numbers(schema)):
        return {"enum": numbers}
    if facts is not None and isinstance(schema.get("enum"), list):
        # The choices the goal asks for ("reverse order": reverse_words), when it asks for any.
        named = [v for v in schema["enum"] if facts.names_choice(v)]
        if named:
            return {"enum": named}
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
        items = dict(schema["items"])
        if facts is not None:
            items.pop("x-path", None)  # an item list of paths takes any of the goal's strings
        out["items"] = grammar_value(items, options, facts)
        if facts is not None:
            # An unbounded array is where a small model repeats itself until its tokens run out.
            enum = out["items"].get("enum")
            most = max(1, len(enum)) if isinstance(enum, list) else _MAX_GRAMMAR_ITEMS
            declared = schema.get("maxItems")
            most = min(most, _MAX_GRAMMAR_ITEMS, declared if isinstance(declared, int) else most)
            found_least = schema.get("minItems")
            least = found_least if isinstance(found_least, int) else 0
            out["maxItems"] = max(most, least)
            if least:
                out["minItems"] = least
    props = schema.get("properties")
    if isinstance(props, dict) and props:
        out["properties"] = {k: grammar_value(v, options) for k, v in props.items()}
        if isinstance(schema.get("required"), list):
            out["required"] = list(schema["required"])
    if out.get("type") == "object" and "properties" not in out:
        out = {"type": "object"}  # a free object: the converter's generic one
    return out


def ref_schema(output_keys: list[str], earlier: list[str] | None = None) -> dict[str, Any]:
    """A step reference; with `earlier`, only to those step ids (a step cannot name itself or a later one)."""
    keys = "|".join(sorted(set(output_keys)))
    tail = f"(\\.({keys}))?" if keys else "(\\.[A-Za-z0-9_]+)?"
    ids = f"({'|'.join(earlier)})" if earlier else "[a-z][a-z0-9_]*"
    return {
        "type": "object",
        "properties": {REF_KEY: {"type": "string", "pattern": anchored(f"^steps\\.{ids}\\.output{tail}$")}},
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
    input_schema: dict[str, Any],
    ref: dict[str, Any] | None,
    options: list[str] | None = None,
    facts: GoalFacts | None = None,
) -> list[dict[str, Any]]:
    """The args object, one alternative per argument group; every argument may be a step reference
    (`ref`; None for the first step). With `facts`, optional arguments the goal names nothing for
    are left out, and a group whose required path the goal does not name needs a reference."""
    props: dict[str, Any] = dict(input_schema.get("properties") or {})
    required = [r for r in input_schema.get("required") or [] if r in props]
    groups = _groups(input_schema) or [[]]
    grouped = {name for g in groups for name in g}
    out = []
    for group in groups:
        needed = list(dict.fromkeys([*required, *group]))
        names = [n for n in props if n not in grouped or n in group]
        if facts is not None:
            names = [n for n in names if n in needed or fillable(n, props[n], facts)]
        properties: dict[str, Any] = {}
        for name in names:
            try:
                value = grammar_value(props[name], options, facts)
            except Unfillable:
                if ref is None:
                    break  # a first step cannot take this group: nothing earlier to refer to
                properties[name] = ref
                continue
            properties[name] = {"anyOf": [value, ref]} if ref is not None else value
        else:
            out.append(
                {
                    "type": "object",
                    "properties": properties,
                    "required": needed,
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

    schema = template.input_schema(arg_schema)
    for input_name, input_schema in schema["properties"].items():
        # An input that is a whole path argument of a step is a path (the trust check and the
        # grammar hold it to the goal's paths); the template's own schema does not say so.
        whole = f"${{inputs.{input_name}}}"
        for step in template.steps:
            for arg, value in (step.get("args") or {}).items():
                fed = arg_schema(str(step.get("plugin")), str(step.get("action")), arg) if value == whole else None
                if isinstance(fed, dict) and fed.get("x-path") and "x-path" not in input_schema:
                    input_schema["x-path"] = fed["x-path"]
    return schema


def template_schema(
    templates: TemplateCatalog,
    plugins: PluginCatalog,
    name: str,
    options: list[str] | None = None,
    facts: GoalFacts | None = None,
) -> dict[str, Any] | None:
    inputs = template_inputs(templates, plugins, name)
    if inputs is None:
        return None
    needed = set(inputs.get("required") or [])
    props = {k: v for k, v in inputs["properties"].items() if facts is None or k in needed or fillable(k, v, facts)}
    properties: dict[str, Any] = {}
    for key, value in props.items():
        try:
            properties[key] = grammar_value(value, options, facts)
        except Unfillable:
            # No path in the goal for a path input: any of its strings (the trust check holds the plan).
            properties[key] = grammar_value({k: v for k, v in value.items() if k != "x-path"}, options, facts)
    inputs["properties"] = properties
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


def _step_alternatives(
    plugins: PluginCatalog,
    actions: list[tuple[str, str]],
    index: int,
    keys: list[str],
    options: list[str] | None,
    facts: GoalFacts | None,
) -> list[dict[str, Any]]:
    """What the step at `index` may be: one of `actions`, referring only to the steps before it."""
    ref = ref_schema(keys, [step_id(i) for i in range(index)]) if index else None
    out = []
    for plugin_name, action_name in actions:
        plugin = plugins.get(plugin_name)
        action = plugin.manifest.actions.get(action_name) if plugin else None
        if action is None:
            continue
        for args in args_alternatives(action.input_schema, ref, options, facts):
            out.append(
                {
                    "type": "object",
                    "properties": {
                        "id": {"const": step_id(index)},
                        "plugin": {"const": plugin_name},
                        "action": {"const": action_name},
                        "args": args,
                    },
                    "required": ["id", "plugin", "action", "args"],
                    "additionalProperties": False,
                }
            )
    return out


def plan_schema(
    plugins: PluginCatalog,
    templates: TemplateCatalog,
    template_names: list[str],
    actions: list[tuple[str, str]],
    options: list[str] | None = None,
    facts: GoalFacts | None = None,
) -> dict[str, Any]:
    """The answer's schema for these candidates: a template, steps over these actions, or a refusal.

    `options`: the strings a plain string argument may take (see `goal_options`); None leaves them free.
    `facts`: the goal's own values; with them, arguments the goal cannot fill are left out (see the
    module's docstring). The steps are spelt out per count (1 to MAX_GOAL_STEPS) and position, so
    that each position has its own id and refers only to the positions before it.
    """
    if facts is not None and options is None:
        options = facts.options
    alternatives: list[dict[str, Any]] = []
    for name in template_names:
        schema = template_schema(templates, plugins, name, options, facts)
        if schema is not None:
            alternatives.append(schema)
    keys = output_keys(plugins, actions)
    # With the goal's facts, no more steps than actions to choose from and things the goal asks for:
    # SmolLM2 otherwise repeats a step until its tokens run out, or adds one nobody asked for.
    most = min(MAX_GOAL_STEPS, max(1, len(actions)), goal_parts(facts.text)) if facts is not None else MAX_GOAL_STEPS
    positions = [_step_alternatives(plugins, actions, i, keys, options, facts) for i in range(most)]
    if not positions[0] and facts is not None:
        # No action can start from what the goal names: offer them with free arguments, checked afterwards.
        positions[0] = _step_alternatives(plugins, actions, 0, keys, options, None)
    plans = []
    for count in range(1, most + 1):
        if not all(positions[:count]):
            break
        plans.append(
            {
                "type": "array",
                "prefixItems": [{"anyOf": positions[i]} for i in range(count)],
                "minItems": count,
                "maxItems": count,
            }
        )
    if plans:
        alternatives.append(
            {
                "type": "object",
                "properties": {"steps": {"anyOf": plans}},
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
