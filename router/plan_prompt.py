"""The planning prompt: the shortlisted candidates, a few varied examples, and a token budget that fits.

A small model copies a single example; three examples of three shapes (a template, two steps
joined by a reference, a refusal) show the shapes without one answer to copy, and their values
are recorded so that the trust check can tell an argument copied from them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet.plugin_catalog import PluginCatalog
from edgefleet.router.plan_candidates import Shortlist
from edgefleet.router.plan_schema import GoalFacts, fillable, template_inputs
from edgefleet.templates import TemplateCatalog

# The fixed part (instructions and examples) comes first and the candidates last, so that an
# in-process model reuses its evaluated prefix from one goal to the next.
SYSTEM = """You turn a goal into a JSON plan for edgefleet, a task cluster. Answer with one JSON object only:
- a template: {"template": "<name>", "inputs": {...}}
- or steps: {"steps": [{"id": "s1", "plugin": "<plugin>", "action": "<action>", "args": {...}}]}
  step ids are s1, s2, ...; a step uses an earlier step's output as an argument: {"ref": "steps.s1.output.<key>"}
- or, when nothing listed does what the goal asks: {"refuse": "<why>"}
Pick from what the user lists, best match first. Use only values the goal gives."""

REPAIR = "Not valid: %s. Answer again with one corrected JSON object."


@dataclass(frozen=True)
class Example:
    goal: str
    listed: str  # the candidates as the example's user message lists them
    answer: dict[str, Any]


# Values no real goal is likely to name: an argument equal to one of them was copied.
EXAMPLES: tuple[Example, ...] = (
    Example(
        "Book a table for two at a restaurant tonight",
        "- step plugin sleep, action sleep (args seconds: number): Sleep for a while.",
        {"refuse": "nothing listed can book restaurants"},
    ),
    Example(
        "Count the words of 'lorem ipsum dolor' and shout it",
        '- template "text-report" (inputs text: string, op?: string): Count the words of a text, then transform it.\n'
        "- step plugin text, action count (args text | path): Count words, lines and characters.",
        {"template": "text-report", "inputs": {"text": "lorem ipsum dolor"}},
    ),
    Example(
        "Download https://example.invalid/notes.txt and count its words",
        "- step plugin http_fetch, action get (args url: string, filename?: string) -> output path: Download a URL.\n"
        "- step plugin text, action count (args text | path) -> output words: Count words.",
        {
            "steps": [
                {
                    "id": "s1",
                    "plugin": "http_fetch",
                    "action": "get",
                    "args": {"url": "https://example.invalid/notes.txt"},
                },
                {
                    "id": "s2",
                    "plugin": "text",
                    "action": "count",
                    "args": {"path": {"ref": "steps.s1.output.path"}},
                },
            ]
        },
    ),
)


def _user(goal: str, listed: str) -> str:
    return f"You can use:\n{listed}\nGoal: {goal}"


def example_values() -> set[str]:
    """Every literal string and number in the examples' answers (the trust check looks for copies)."""
    found: set[str] = set()

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k not in ("id", "plugin", "action", "template", "ref", "refuse"):
                    walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            found.add(str(value))

    for example in EXAMPLES:
        walk(example.answer)
    return found


def _first_sentence(text: str, limit: int = 140) -> str:
    text = " ".join(text.split())
    cut = text.find(". ")
    if 0 < cut < limit:
        return text[: cut + 1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _arg_list(schema: dict[str, Any], facts: GoalFacts | None = None) -> str:
    """The arguments as the grammar offers them: with `facts`, optional ones only when the goal fills them."""
    props = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    groups = schema.get("oneOf") or schema.get("anyOf") or []
    alternatives = [g.get("required") or [] for g in groups if isinstance(g, dict)]
    grouped = {n for g in alternatives for n in g}
    parts = []
    if alternatives:
        parts.append(" | ".join("+".join(g) for g in alternatives if g))
    for name, spec in props.items():
        if name in grouped or (facts is not None and name not in required and not fillable(name, spec, facts)):
            continue
        kind = spec.get("type", "") if isinstance(spec, dict) else ""
        enum = spec.get("enum") if isinstance(spec, dict) else None
        shown = "/".join(str(v) for v in enum) if enum else (kind if isinstance(kind, str) else "/".join(kind))
        parts.append(f"{name}{'' if name in required else '?'}: {shown}")
    return ", ".join(parts)


def describe_candidates(
    shortlist: Shortlist, plugins: PluginCatalog, templates: TemplateCatalog, facts: GoalFacts | None = None
) -> str:
    lines = []
    for candidate in shortlist.candidates:
        if candidate.kind == "template":
            template = templates.get(candidate.name)
            if template is None:
                continue
            needed = {n for n, spec in template.inputs.items() if spec.required and spec.default is None}
            found = template_inputs(templates, plugins, candidate.name)
            constrained = found["properties"] if found else {}
            inputs = ", ".join(
                f"{n}{'' if n in needed else '?'}: {spec.type}"
                for n, spec in template.inputs.items()
                if facts is None or n in needed or fillable(n, constrained.get(n) or {"type": spec.type}, facts)
            )
            lines.append(f'- template "{candidate.name}" (inputs {inputs}): {_first_sentence(template.description)}')
            continue
        plugin_name, _, action_name = candidate.name.partition(".")
        plugin = plugins.get(plugin_name)
        action = plugin.manifest.actions.get(action_name) if plugin else None
        if action is None:
            continue
        outputs = ", ".join(list((action.output_schema or {}).get("properties") or {})[:6])
        line = f"- step plugin {plugin_name}, action {action_name} (args {_arg_list(action.input_schema, facts)})"
        if outputs:
            line += f" -> output {outputs}"
        lines.append(f"{line}: {_first_sentence(action.description)}")
    return "\n".join(lines)


def build_messages(
    goal: str,
    shortlist: Shortlist,
    plugins: PluginCatalog,
    templates: TemplateCatalog,
    *,
    examples: Sequence[Example] = EXAMPLES,
    facts: GoalFacts | None = None,
) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}]
    for example in examples:
        messages.append({"role": "user", "content": _user(example.goal, example.listed)})
        messages.append({"role": "assistant", "content": json.dumps(example.answer)})
    messages.append({"role": "user", "content": _user(goal, describe_candidates(shortlist, plugins, templates, facts))})
    return messages


def repair_message(problems: Sequence[tuple[str, str]], limit: int = 4) -> dict[str, str]:
    """A short list of what was wrong: a long one would not fit the context of a small model."""
    shown = [f"{f}: {r[:100]}" for f, r in problems[:limit]]
    if len(problems) > limit:
        shown.append(f"{len(problems) - limit} more")
    return {"role": "user", "content": REPAIR % "; ".join(shown)}


# About 3.2 characters a token for this JSON-heavy English (SmolLM2 and llama tokenizers
# give 3.4-4); under-estimating the characters per token keeps the answer inside the context.
CHARS_PER_TOKEN = 3.2
TOKENS_PER_MESSAGE = 6  # the chat template's markers around each message


def estimate_tokens(messages: Sequence[dict[str, str]]) -> int:
    return sum(math.ceil(len(m["content"]) / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE for m in messages) + 4
