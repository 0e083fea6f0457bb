"""Turns a job request into a validated DAG of subtasks, or a list of (field, reason) errors."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pydantic import ValidationError

from edgefleet.plugin_catalog import PluginCatalog, validate_action_args
from edgefleet.plugin_paths import check_path_argument, grants_for, path_arguments
from edgefleet.refs import RefError, find_refs, top_level_keys_with_refs
from edgefleet.schemas import JobRequest, NodeInfo, Plan, PlannedSubtask, ResourceClass, StepSpec
from edgefleet.settings import Settings
from edgefleet.templates import TemplateCatalog, TemplateError

Problem = tuple[str, str]


class PlanError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(f"{f}: {r}" for f, r in problems))
        self.problems = problems


def pydantic_problems(error: ValidationError, prefix: str = "") -> list[Problem]:
    problems = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"])
        field = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "body")
        problems.append((field, item["msg"]))
    return problems


class Planner:
    def __init__(self, plugins: PluginCatalog, templates: TemplateCatalog, settings: Settings) -> None:
        self.plugins = plugins
        self.templates = templates
        self.settings = settings

    def plan(self, request: JobRequest, nodes: list[NodeInfo] | None = None) -> Plan:
        """The validated plan of `request`, or PlanError listing every problem.

        With `nodes` (the live worker nodes), each step must also be runnable on
        one of them (see `capability_problems`); None skips that check.
        """
        steps = self._steps_of(request)
        problems: list[Problem] = []
        if not steps:
            raise PlanError([("steps", "a plan needs at least one step")])
        if len(steps) > self.settings.max_subtasks:
            raise PlanError([("steps", f"at most {self.settings.max_subtasks} steps per job")])

        index_of: dict[str, int] = {}
        for i, step in enumerate(steps):
            if step.id in index_of:
                problems.append((f"steps.{i}.id", f"duplicate step id {step.id!r}"))
            else:
                index_of[step.id] = i

        needs: dict[str, list[str]] = {}
        for i, step in enumerate(steps):
            needs[step.id] = self._needs_of(i, step, index_of, problems)
            self._check_plugin(i, step, problems)
        if problems:
            raise PlanError(problems)

        cycle = _find_cycle(needs)
        if cycle:
            first = cycle[0]
            raise PlanError([(f"steps.{index_of[first]}.needs", "cycle in needs: " + " -> ".join(cycle))])

        dependents: dict[str, list[str]] = defaultdict(list)
        for step in steps:
            for dep in needs[step.id]:
                dependents[dep].append(step.id)
        plan = Plan(
            subtasks=[
                PlannedSubtask(
                    id=step.id,
                    plugin=step.plugin,
                    action=step.action,
                    args=step.args,
                    needs=needs[step.id],
                    dependents=dependents[step.id],
                    resource_class=step.resource_class or self.plugins.get(step.plugin).manifest.resource_class,  # type: ignore[union-attr]
                    node=step.node,
                    timeout=step.timeout,
                    retries=step.retries,
                    retry_backoff=step.retry_backoff,
                )
                for step in steps
            ]
        )
        if nodes is not None:
            explicit = {i for i, step in enumerate(steps) if step.resource_class is not None}
            problems = capability_problems(plan, nodes, explicit_class=explicit)
            if problems:
                raise PlanError(problems)
        return plan

    def expand(self, request: JobRequest) -> list[StepSpec]:
        """The steps `request` names: its own, or its template's with the inputs substituted."""
        return self._steps_of(request)

    def _steps_of(self, request: JobRequest) -> list[StepSpec]:
        given = [k for k in ("steps", "template", "goal") if getattr(request, k) is not None]
        if len(given) != 1:
            raise PlanError([("steps", "give exactly one of 'steps', 'template' or 'goal'")])
        if request.goal is not None:
            raise PlanError([("goal", "a goal is planned by the model before validation")])
        if request.steps is not None:
            if request.inputs:
                raise PlanError([("inputs", "inputs belong to a template; this job has steps")])
            return request.steps
        try:
            raw_steps: list[dict[str, Any]] = self.templates.expand(request.template or "", request.inputs)
        except TemplateError as exc:
            raise PlanError([(exc.field, exc.reason)]) from exc
        steps: list[StepSpec] = []
        problems: list[Problem] = []
        for i, raw in enumerate(raw_steps):
            try:
                steps.append(StepSpec.model_validate(raw))
            except ValidationError as exc:
                problems += pydantic_problems(exc, f"template.steps.{i}")
        if problems:
            raise PlanError(problems)
        return steps

    def _needs_of(self, i: int, step: StepSpec, index_of: dict[str, int], problems: list[Problem]) -> list[str]:
        result: list[str] = []
        for dep in step.needs:
            if dep == step.id:
                problems.append((f"steps.{i}.needs", f"step {step.id!r} cannot need itself"))
            elif dep not in index_of:
                problems.append((f"steps.{i}.needs", f"unknown step {dep!r}"))
            elif dep not in result:
                result.append(dep)
        try:
            refs = find_refs(step.args, base=f"steps.{i}.args")
        except RefError as exc:
            problems.append((exc.field, exc.reason))
            return result
        for ref in refs:
            if ref.step == step.id:
                problems.append((ref.field, "$ref to the step itself"))
            elif ref.step not in index_of:
                problems.append((ref.field, f"$ref to unknown step {ref.step!r}"))
            elif ref.step not in result:
                result.append(ref.step)  # a reference is a dependency
        return result

    def _check_plugin(self, i: int, step: StepSpec, problems: list[Problem]) -> None:
        plugin = self.plugins.get(step.plugin)
        if plugin is None:
            known = ", ".join(self.plugins.names()) or "none"
            problems.append((f"steps.{i}.plugin", f"unknown plugin {step.plugin!r} (known: {known})"))
            return
        action = plugin.manifest.actions.get(step.action)
        if action is None:
            known = ", ".join(sorted(plugin.manifest.actions))
            problems.append(
                (f"steps.{i}.action", f"plugin {step.plugin!r} has no action {step.action!r} (has: {known})")
            )
            return
        if step.timeout > self.settings.max_subtask_timeout:
            problems.append((f"steps.{i}.timeout", f"at most {self.settings.max_subtask_timeout:g} seconds"))
        try:
            unresolved = top_level_keys_with_refs(step.args)
        except RefError:
            return  # reported by _needs_of
        for field, reason in validate_action_args(action.input_schema, step.args, unresolved=unresolved):
            problems.append((f"steps.{i}.{field}", reason))
        grants = None  # worked out only for a step with path arguments: most have none
        for field, value, access in path_arguments(action.input_schema, step.args):
            if grants is None:
                grants = grants_for(self.settings, step.plugin, frozenset(plugin.manifest.permissions))
            refused = check_path_argument(step.plugin, value, access, grants)
            if refused:
                problems.append((f"steps.{i}.{field}", refused))


# --- can the fleet run it? ---------------------------------------------------------------------

MAX_NODES_SHOWN = 8


def _node_list(nodes: list[NodeInfo], plugin: str) -> str:
    shown = []
    for node in nodes[:MAX_NODES_SHOWN]:
        classes = ",".join(c.value for c in node.classes)
        note = "" if plugin in node.plugins else f" without {plugin!r}"
        shown.append(f"{node.name}[{classes}]{note}")
    if len(nodes) > MAX_NODES_SHOWN:
        shown.append(f"and {len(nodes) - MAX_NODES_SHOWN} more")
    return ", ".join(shown)


def capability_problems(
    plan: Plan, nodes: list[NodeInfo], *, explicit_class: set[int] | frozenset[int] = frozenset()
) -> list[Problem]:
    """The steps of `plan` that no live node can run, as (field, reason) problems.

    A step can run where a live node serves its resource class and advertises
    its plugin (a node advertises only the plugins whose dependencies it meets);
    a step pinned to a `node` needs that node live, serving the class and
    advertising the plugin. With no live node at all nothing is refused: the
    fleet is starting or restarting, and the job waits for it.

    The field at fault is `steps.N.node` for a pinned step, `steps.N.resource_class`
    when the step chose its class (index in `explicit_class`), else `steps.N.plugin`.
    """
    if not nodes:
        return []
    by_name = {node.name: node for node in nodes}
    problems: list[Problem] = []
    for i, st in enumerate(plan.subtasks):
        rc: ResourceClass = st.resource_class
        class_field = f"steps.{i}.resource_class" if i in explicit_class else f"steps.{i}.plugin"
        if st.node:
            node = by_name.get(st.node)
            if node is None:
                live = ", ".join(sorted(by_name)[:MAX_NODES_SHOWN])
                problems.append((f"steps.{i}.node", f"node {st.node!r} is not live (live nodes: {live})"))
            elif rc not in node.classes:
                served = ",".join(c.value for c in node.classes)
                problems.append((class_field, f"node {st.node!r} does not serve class {rc.value} (it serves {served})"))
            elif st.plugin not in node.plugins:
                problems.append(
                    (
                        f"steps.{i}.plugin",
                        f"node {st.node!r} does not advertise plugin {st.plugin!r} "
                        "(its dependencies are not met there)",
                    )
                )
            continue
        if any(rc in node.classes and st.plugin in node.plugins for node in nodes):
            continue
        problems.append(
            (
                class_field,
                f"no live worker serves class {rc.value} with plugin {st.plugin!r} "
                f"(nodes: {_node_list(nodes, st.plugin)})",
            )
        )
    return problems


def _find_cycle(needs: dict[str, list[str]]) -> list[str] | None:
    """Iterative DFS: returns one cycle as a path that starts and ends at the same step."""
    white, grey, black = 0, 1, 2
    color = {node: white for node in needs}
    for root in needs:
        if color[root] != white:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = []
        while stack:
            node, child_index = stack.pop()
            if child_index == 0:
                color[node] = grey
                path.append(node)
            children = needs[node]
            if child_index < len(children):
                stack.append((node, child_index + 1))
                child = children[child_index]
                if color[child] == grey:
                    return [*path[path.index(child) :], child]
                if color[child] == white:
                    stack.append((child, 0))
            else:
                color[node] = black
                path.pop()
    return None
