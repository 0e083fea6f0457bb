"""Does a valid plan serve its goal? The check a model's plan must pass to run without a person.

Validation says a plan *can* run; this says whether it is the plan the goal asked for, as far as
that can be told without a model: its targets come from the shortlist, every concrete value the
goal names (URLs, paths, quoted text, numbers) reaches the plan, and no argument is invented or
copied from the prompt's examples. A plan that fails is not refused: it is held for a person to
confirm. Goals that ask to destroy, exfiltrate or spend are refused before any model sees them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from edgefleet.plugin_catalog import PluginCatalog
from edgefleet.router.plan_candidates import Shortlist, stem, terms
from edgefleet.router.plan_schema import Answer, goal_parts, names_choice, template_inputs
from edgefleet.templates import TemplateCatalog

_URL = re.compile(r"https?://[^\s'\"<>]+", re.IGNORECASE)
_PATH = re.compile(r"(?<![\w:/.])/(?:[\w.@~+-]+/?)+")
_QUOTED = re.compile(r"'([^']{1,500})'|\"([^\"]{1,500})\"|“([^”]{1,500})”")
_NUMBER = re.compile(r"(?<![\w./-])\d+(?:\.\d+)?(?![\w/])")
# What the catalogue never does on anyone's behalf: destroy data, hand out secrets, spend money,
# control the fleet itself. Checked on whole words of the goal.
_UNSAFE = {
    "destroys data": r"\b(delete|deleting|erase|wipe|wiping|destroy|shred|purge|format the disk|rm\s+-rf?|drop\s+table|truncate)\b",
    "reads secrets": r"(/etc/shadow|/etc/passwd|\bssh\b|private key|\bpasswords?\b|\bcredentials?\b|\bapi keys?\b|\bsecret\b)",
    "spends money": r"\b(buy|purchase|pay|transfer|credit card|bitcoin|invoice)\b",
    "controls the fleet": r"\b(shut ?down|reboot|power off|kill (all|every)|disable)\b",
}


def unsafe_reason(goal: str) -> str | None:
    """Why `goal` must be refused as unsafe, or None."""
    text = goal.lower()
    for what, pattern in _UNSAFE.items():
        match = re.search(pattern, text)
        if match:
            return f"the goal asks for something that {what} ({match.group(0).strip()!r}); edgefleet does not plan that"
    return None


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w/.:@~+-]+", " ", text.lower()).split()).strip(" .")


def goal_values(goal: str) -> list[str]:
    """The concrete values a goal names: URLs, absolute paths, quoted text, numbers."""
    values: list[str] = []
    rest = goal
    for url in _URL.findall(goal):
        values.append(url.rstrip(".,;:!?)"))
        rest = rest.replace(url, " ")
    for match in _QUOTED.finditer(rest):
        values.append(next(g for g in match.groups() if g is not None))
    unquoted = _QUOTED.sub(" ", rest)
    values += [p.rstrip(".,;:!?)") for p in _PATH.findall(unquoted) if len(p) > 1]
    values += _NUMBER.findall(_PATH.sub(" ", unquoted))
    return list(dict.fromkeys(v for v in values if v.strip()))


@dataclass(frozen=True)
class Verdict:
    """`trusted`: the plan may run without confirmation. `reasons` say why, or why not."""

    trusted: bool
    reasons: list[str] = field(default_factory=list)


def _literals(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        if "$ref" in value or "$artifact" in value:
            return
        for k, v in value.items():
            yield from _literals(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _literals(v, f"{path}.{i}")
    elif not isinstance(value, bool) and value is not None:
        yield path, value


def _schema_for(schema: Any, path: list[str]) -> dict[str, Any]:
    """The subschema of an args path such as ["labels", "0"] (items for list indexes)."""
    for part in path:
        if not isinstance(schema, dict):
            return {}
        if part.isdigit() and isinstance(schema.get("items"), dict):
            schema = schema["items"]
        else:
            schema = (schema.get("properties") or {}).get(part, {})
    return schema if isinstance(schema, dict) else {}


class TrustCheck:
    def __init__(self, plugins: PluginCatalog, templates: TemplateCatalog, example_values: set[str]) -> None:
        self.plugins = plugins
        self.templates = templates
        self.example_values = {_norm(v) for v in example_values}

    def check(self, goal: str, shortlist: Shortlist, answer: Answer) -> Verdict:
        problems: list[str] = []
        norm_goal = _norm(goal)
        literals: list[tuple[str, Any, dict[str, Any]]] = []  # (field, value, its schema)
        if answer.template is not None:
            if answer.template not in shortlist.templates:
                problems.append(f"template {answer.template!r} is not among the candidates for this goal")
            template = self.templates.get(answer.template)
            found = template_inputs(self.templates, self.plugins, answer.template)
            constrained = found["properties"] if found else {}
            for field_name, value in _literals(answer.inputs, "inputs"):
                name = field_name.split(".")[1]
                spec = template.inputs.get(name) if template else None
                schema: dict[str, Any] = dict(constrained.get(name) or {})
                if spec is not None and spec.default is not None:
                    schema["default"] = spec.default
                literals.append(
                    (field_name, value, _schema_for({"properties": {name: schema}}, field_name.split(".")[1:]))
                )
        else:
            allowed = set(shortlist.actions)
            if len(answer.steps or []) > goal_parts(goal):
                problems.append(
                    f"the plan has {len(answer.steps or [])} steps, the goal asks for {goal_parts(goal)} thing(s)"
                )
            seen: dict[str, int] = {}
            for i, step in enumerate(answer.steps or []):
                same = repr((step.get("plugin"), step.get("action"), step.get("args")))
                if same in seen:
                    problems.append(f"step {i} repeats step {seen[same]}")
                seen.setdefault(same, i)
                key = (str(step.get("plugin")), str(step.get("action")))
                if key not in allowed:
                    problems.append(f"step {i} uses {key[0]}.{key[1]}, not among the candidates for this goal")
                plugin = self.plugins.get(key[0])
                action = plugin.manifest.actions.get(key[1]) if plugin else None
                input_schema = action.input_schema if action else {}
                for field_name, value in _literals(step.get("args") or {}, f"steps.{i}.args"):
                    parts = field_name.split(".")[3:]
                    literals.append((field_name, value, _schema_for(input_schema, parts)))
        named = goal_values(goal)
        paths = [_norm(v) for v in named if v.startswith("/")]
        best = self._best_actions(shortlist)
        planned = self._planned_actions(answer)
        if best and not best <= planned:
            # The retriever and the model disagree on what the goal is about: a person decides.
            problems.append(f"the plan does not use {shortlist.candidates[0].name}, the best match for the goal")
        used = " ".join(_norm(str(v)) for _, v, _ in literals)
        # A value given as a whole argument and again as a list item (the text to classify as one of
        # its labels) was copied across.
        whole_values = {_norm(str(v)) for f, v, _ in literals if not re.search(r"\.\d+$", f)}
        own_words = self._own_words(answer)
        seen_lists: dict[str, set[str]] = {}
        for value in named:
            if _norm(value) and _norm(value) not in used:
                problems.append(f"the plan leaves out {value!r}, which the goal names")
        for field_name, value, schema in literals:
            shown = _norm(str(value))
            if not shown:
                continue
            in_list = re.search(r"\.\d+$", field_name) is not None and "enum" not in schema
            parent = field_name.rsplit(".", 1)[0]
            repeated = in_list and parent in seen_lists.get(shown, set())
            if in_list:
                seen_lists.setdefault(shown, set()).add(parent)
            if in_list and (shown == norm_goal or not named or shown in whole_values):
                # A list (images, urls, labels) made of the goal's own sentence, or of its words when it
                # names no value at all ("turn off the lights" as a slideshow's images): a person decides.
                problems.append(f"{field_name} = {str(value)[:60]!r} is a list item the goal does not name")
            elif repeated:
                problems.append(f"{field_name} = {str(value)[:60]!r} repeats an item of its list")
            elif shown in self.example_values and shown not in norm_goal:
                problems.append(f"{field_name} = {str(value)[:60]!r} is copied from an example")
            elif schema.get("x-path") and not any(shown == p or shown.startswith(p.rstrip("/") + "/") for p in paths):
                problems.append(f"{field_name} = {str(value)[:60]!r} is not a path the goal names")
            elif (
                field_name.count(".") == (1 if field_name.startswith("inputs.") else 3)
                and isinstance(value, str)
                and " " not in shown
                and "enum" not in schema
                and "pattern" not in schema
                and shown not in {_norm(v) for v in named}
                and shown != norm_goal
            ):
                # A lone word of the goal as a whole text argument ("text": "label"): the grammar
                # offers the goal's words for labels and names, not as the text to work on.
                problems.append(f"{field_name} = {str(value)[:60]!r} is one word of the goal, not a value it names")
            elif isinstance(value, str) and " " not in shown and "enum" not in schema and stem(shown) in own_words:
                # A word of the target's own description ("label" as a label of llm.classify) names
                # what to do, not a value to do it with.
                problems.append(f"{field_name} = {str(value)[:60]!r} is a word of the action, not of the goal's values")
            elif not self._grounded(shown, value, schema, norm_goal):
                problems.append(f"{field_name} = {str(value)[:60]!r} is not something the goal says")
        if problems:
            return Verdict(False, problems)
        return Verdict(
            True,
            [
                "every target is a candidate for the goal, and the plan uses the best match",
                "every value the goal names is used, and no argument is invented or copied from an example",
            ],
        )

    def _own_words(self, answer: Answer) -> set[str]:
        """The words of the planned targets' names and descriptions."""
        texts: list[str] = []
        if answer.template is not None:
            template = self.templates.get(answer.template)
            texts += [answer.template, template.description if template else ""]
        for step in answer.steps or []:
            plugin = self.plugins.get(str(step.get("plugin")))
            action = plugin.manifest.actions.get(str(step.get("action"))) if plugin else None
            texts += [str(step.get("plugin")), str(step.get("action")), action.description if action else ""]
        return set(terms(" ".join(texts)))

    def _template_actions(self, name: str) -> set[str]:
        template = self.templates.get(name)
        return {f"{s.get('plugin')}.{s.get('action')}" for s in template.steps} if template else set()

    def _best_actions(self, shortlist: Shortlist) -> set[str]:
        if not shortlist.candidates:
            return set()
        best = shortlist.candidates[0]
        return self._template_actions(best.name) if best.kind == "template" else {best.name}

    def _planned_actions(self, answer: Answer) -> set[str]:
        if answer.template is not None:
            return self._template_actions(answer.template)
        return {f"{s.get('plugin')}.{s.get('action')}" for s in answer.steps or []}

    @staticmethod
    def _grounded(shown: str, value: Any, schema: dict[str, Any], norm_goal: str) -> bool:
        if shown in norm_goal:
            return True
        enum = schema.get("enum")
        if isinstance(enum, list) and value in enum:
            # A choice among fixed options the goal asks for ("all caps": op upper), not any of them.
            return isinstance(value, str) and names_choice(norm_goal, value)
        if "default" in schema and schema["default"] == value:
            return True
        if isinstance(value, str) and len(shown) > 12:
            # A longer text the model reworded slightly ("Write a haiku about rain."): most of its
            # words must come from the goal.
            words = [w for w in shown.split() if len(w) > 2]
            goal_words = set(norm_goal.split())
            return bool(words) and sum(w in goal_words for w in words) / len(words) >= 0.8
        return False
