"""Plans a natural-language goal with the model router (task type `planning`).

The model's answer is constrained by a JSON schema built from the plugin
catalogue, then validated exactly like an explicit plan. One repair round sends
the validation errors back; a plan that is still invalid is a 422 that shows
the model's last answer, never a crash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from edgefleet.plugin_catalog import PluginCatalog
from edgefleet.schemas import JobRequest, NodeInfo, Plan, StepSpec
from router.planner import PlanError, Planner, Problem, pydantic_problems

MAX_PLAN_TOKENS = 768
MAX_GOAL_STEPS = 4
# JSON-schema keywords the grammar of a small local model follows reliably; the rest is
# checked by the real validation afterwards (and reported in the repair round).
_KEPT_KEYWORDS = {"type", "properties", "required", "enum", "items", "minimum", "maximum", "default", "description"}

SYSTEM_PROMPT = """You plan jobs for edgefleet, a task cluster. A plan is JSON:
{"steps": [{"id": "<short id>", "plugin": "<plugin>", "action": "<action>", "args": {...}, "needs": ["<earlier step id>", ...]}]}
Use only these plugins and actions; args must match each action's inputs:
%s
Rules: at most %d steps; ids are short lowercase words; a step that uses another step's output
lists it in "needs" and refers to it with {"$ref": "steps.<id>.output.<key>"} as an argument value.
Example: for the goal "Shout the text 'good morning'" the plan is
{"steps": [{"id": "shout", "plugin": "text", "action": "transform", "args": {"text": "good morning", "op": "upper"}}]}
Answer with the JSON plan only."""


class GoalPlanError(Exception):
    def __init__(self, problems: list[Problem], answer: str, model: str | None) -> None:
        super().__init__("; ".join(f"{f}: {r}" for f, r in problems))
        self.problems = problems
        self.answer = answer
        self.model = model


@dataclass(frozen=True)
class GoalPlan:
    steps: list[StepSpec]
    plan: Plan
    model: str
    fell_back_from: list[tuple[str, str]]
    repaired: bool


def _simplify(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {k: _simplify(v) for k, v in schema.items() if k in _KEPT_KEYWORDS}
        # "one of these groups is required": the grammar asks for the first group, so a small
        # model cannot leave all of them out.
        choices = schema.get("oneOf") or schema.get("anyOf")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict) and "required" in choices[0]:
            out["required"] = sorted(set(out.get("required", [])) | set(choices[0]["required"]))
        if "properties" in schema:
            out["properties"] = {name: _simplify(sub) for name, sub in schema["properties"].items()}
        return out
    if isinstance(schema, list):
        return [_simplify(item) for item in schema]
    return schema


def plan_schema(catalog: PluginCatalog, plugins: list[str]) -> dict[str, Any]:
    """One alternative per plugin action, so the model can only name real ones."""
    alternatives = []
    for name in plugins:
        plugin = catalog.get(name)
        if plugin is None:
            continue
        for action_name, action in sorted(plugin.manifest.actions.items()):
            args = _simplify(action.input_schema)
            alternatives.append(
                {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,15}$"},
                        "plugin": {"const": name},
                        "action": {"const": action_name},
                        "args": args,
                        "needs": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_GOAL_STEPS},
                    },
                    "required": ["id", "plugin", "action", "args"],
                }
            )
    return {
        "type": "object",
        "properties": {
            "steps": {"type": "array", "items": {"anyOf": alternatives}, "minItems": 1, "maxItems": MAX_GOAL_STEPS}
        },
        "required": ["steps"],
    }


def describe_catalog(catalog: PluginCatalog, plugins: list[str]) -> str:
    lines = []
    for name in plugins:
        plugin = catalog.get(name)
        if plugin is None:
            continue
        for action_name, action in sorted(plugin.manifest.actions.items()):
            props = action.input_schema.get("properties", {})
            required = set(action.input_schema.get("required", []))
            args = ", ".join(
                f"{arg}{'' if arg in required else '?'}: {spec.get('type', 'any')}" for arg, spec in props.items()
            )
            lines.append(f"- {name}.{action_name}({args}): {action.description.strip()[:160]}")
    return "\n".join(lines)


class GoalPlanner:
    def __init__(self, planner: Planner, catalog: PluginCatalog, models: Any) -> None:
        """`models` is a ModelRouter (edgefleet.models.router)."""
        self.planner = planner
        self.catalog = catalog
        self.models = models

    def plannable_plugins(self, nodes: list[NodeInfo]) -> list[str]:
        """The plugins some live node can run, or the whole catalogue when no node is live yet."""
        live = {p for node in nodes for p in node.plugins}
        names = [n for n in self.catalog.names() if not live or n in live]
        return names

    def plan(self, goal: str, *, nodes: list[NodeInfo], priority: Any = None) -> GoalPlan:
        plugins = self.plannable_plugins(nodes)
        schema = plan_schema(self.catalog, plugins)
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT % (describe_catalog(self.catalog, plugins), MAX_GOAL_STEPS)},
            {"role": "user", "content": f"Goal: {goal}"},
        ]
        completion = self.models.complete("planning", messages, max_tokens=MAX_PLAN_TOKENS, json_schema=schema)
        problems, steps = self._validate(completion.text, nodes)
        repaired = False
        if problems:
            repaired = True
            messages += [
                {"role": "assistant", "content": completion.text},
                {
                    "role": "user",
                    "content": "That plan is invalid:\n"
                    + "\n".join(f"- {f}: {r}" for f, r in problems)
                    + "\nAnswer with a corrected JSON plan only.",
                },
            ]
            completion = self.models.complete("planning", messages, max_tokens=MAX_PLAN_TOKENS, json_schema=schema)
            problems, steps = self._validate(completion.text, nodes)
        if problems or steps is None:
            raise GoalPlanError(problems, completion.text, completion.model)
        plan = self.planner.plan(JobRequest(steps=steps), nodes=nodes)
        return GoalPlan(
            steps=steps,
            plan=plan,
            model=completion.model,
            fell_back_from=[(a.model, a.reason) for a in completion.fallbacks],
            repaired=repaired,
        )

    def _validate(self, text: str, nodes: list[NodeInfo]) -> tuple[list[Problem], list[StepSpec] | None]:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            return [("plan", f"not valid JSON: {exc}")], None
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
            return [("plan", "must be an object with a list of steps")], None
        if len(data["steps"]) > MAX_GOAL_STEPS:
            return [("plan.steps", f"at most {MAX_GOAL_STEPS} steps")], None
        try:
            request = JobRequest(steps=data["steps"])
        except ValidationError as exc:
            return pydantic_problems(exc, "plan"), None
        try:
            self.planner.plan(request, nodes=nodes)
        except PlanError as exc:
            return [(f"plan.{f}", r) for f, r in exc.problems], None
        return [], request.steps
