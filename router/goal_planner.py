"""Plans a natural-language goal with the model router (task type `planning`).

1. A goal that asks to destroy, exfiltrate or spend is refused outright (`plan_trust.unsafe_reason`).
2. The catalogue is narrowed to the few templates and actions the goal is about (`plan_candidates`);
   when nothing matches, the goal is refused without calling a model.
3. The model answers under a grammar (`plan_schema`) that allows only the candidates scoring close
   to the best one (`Shortlist.confident`), arguments the goal can fill, references to earlier steps
   and a refusal, with a prompt (`plan_prompt`) whose answer budget fits the context.
4. The plan is validated exactly like an explicit one; one compact repair round sends the errors back.
5. A valid plan is then checked against the goal (`plan_trust`): the verdict decides whether it may
   run unconfirmed. Deciding that is the submitter's business; here it is only reported.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from edgefleet.models.config import ModelsConfig
from edgefleet.models.errors import REASON_CONTEXT, NoModelAvailable
from edgefleet.plugin_catalog import PluginCatalog
from edgefleet.refs import RefError, find_refs
from edgefleet.router.plan_candidates import Retriever, Shortlist
from edgefleet.router.plan_prompt import EXAMPLES, build_messages, estimate_tokens, example_values, repair_message
from edgefleet.router.plan_schema import MAX_GOAL_STEPS, Answer, AnswerError, GoalFacts, decode, plan_schema
from edgefleet.router.plan_trust import TrustCheck, Verdict, goal_values, unsafe_reason
from edgefleet.router.planner import PlanError, Planner, Problem, pydantic_problems
from edgefleet.schemas import JobRequest, NodeInfo, Plan, StepSpec
from edgefleet.templates import TemplateCatalog

# The most a plan may take; less when the context leaves less (see `_budget`).
MAX_PLAN_TOKENS = 320
# Under this many tokens left for the answer, even a one-step plan does not fit.
MIN_ANSWER_TOKENS = 96
DEFAULT_CONTEXT = 2048
TASK_TYPE = "planning"

__all__ = ["MAX_GOAL_STEPS", "GoalPlan", "GoalPlanError", "GoalPlanner", "GoalRefused", "PlanTooLong"]


class GoalPlanError(Exception):
    """The model's plan is still invalid after the repair round."""

    def __init__(self, problems: list[Problem], answer: str, model: str | None) -> None:
        super().__init__("; ".join(f"{f}: {r}" for f, r in problems))
        self.problems = problems
        self.answer = answer
        self.model = model


class GoalRefused(Exception):
    """The goal cannot (or must not) be planned with this catalogue; `model` is None when no model was asked."""

    def __init__(self, reason: str, model: str | None, candidates: list[str]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.model = model
        self.candidates = candidates


class PlanTooLong(Exception):
    """The prompt and its answer do not fit the planning model's context, or the answer was cut off."""

    def __init__(self, reason: str, model: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.model = model


@dataclass(frozen=True)
class GoalPlan:
    steps: list[StepSpec]
    plan: Plan
    model: str
    fell_back_from: list[tuple[str, str]]
    repaired: bool
    body: dict[str, Any] = field(default_factory=dict)  # the plan as a client would submit it
    verdict: Verdict = field(default_factory=lambda: Verdict(False, ["not checked"]))
    candidates: list[str] = field(default_factory=list)

    @property
    def trusted(self) -> bool:
        return self.verdict.trusted


class GoalPlanner:
    def __init__(self, planner: Planner, catalog: PluginCatalog, models: Any) -> None:
        """`models` is a ModelRouter (edgefleet.models.router)."""
        self.planner = planner
        self.catalog = catalog
        self.templates: TemplateCatalog = planner.templates
        self.models = models
        self.trust = TrustCheck(catalog, self.templates, example_values())
        self._retrievers: dict[frozenset[str], Retriever] = {}
        self._lock = threading.Lock()

    def plannable_plugins(self, nodes: list[NodeInfo]) -> list[str]:
        """The plugins some live node can run, or the whole catalogue when no node is live yet."""
        live = {p for node in nodes for p in node.plugins}
        return [n for n in self.catalog.names() if not live or n in live]

    def shortlist(self, goal: str, nodes: list[NodeInfo]) -> Shortlist:
        allowed = frozenset(self.plannable_plugins(nodes))
        with self._lock:
            retriever = self._retrievers.get(allowed)
            if retriever is None:
                retriever = self._retrievers[allowed] = Retriever(self.catalog, self.templates, allowed)
        return retriever.shortlist(goal)

    def context_size(self) -> int:
        """The smallest context among the planning route's models: the prompt must fit each of them."""
        config: ModelsConfig | None = getattr(self.models, "config", None)
        if config is None:
            return DEFAULT_CONTEXT
        route = config.route(TASK_TYPE)
        sizes = [config.models[m].context_size for m in route.chain() if m in config.models] if route else []
        return min(sizes) if sizes else DEFAULT_CONTEXT

    def plan(self, goal: str, *, nodes: list[NodeInfo], priority: Any = None) -> GoalPlan:
        if (unsafe := unsafe_reason(goal)) is not None:
            raise GoalRefused(unsafe, None, [])
        shortlist = self.shortlist(goal, nodes)
        names = [c.name for c in shortlist.candidates]
        if not shortlist.candidates:
            closest = ", ".join(c.name for c in shortlist.closest) or "nothing"
            raise GoalRefused(
                f"no template or plugin action matches the goal (closest: {closest}); see GET /v1/plugins",
                None,
                [],
            )
        offered = shortlist.confident()
        facts = GoalFacts(goal, goal_values(goal))
        schema = plan_schema(self.catalog, self.templates, offered.templates, offered.actions, facts=facts)
        messages, max_tokens = self._fit(goal, offered, facts)
        completion = self._complete(messages, max_tokens, schema)
        answer, problems, steps = self._read(
            completion.text, completion.finish_reason, max_tokens, nodes, completion.model
        )
        repaired = False
        if problems:
            repaired = True
            retry = [*messages, {"role": "assistant", "content": completion.text}, repair_message(problems)]
            retry, max_tokens = self._trim(retry)
            completion = self._complete(retry, max_tokens, schema)
            answer, problems, steps = self._read(
                completion.text, completion.finish_reason, max_tokens, nodes, completion.model
            )
        if problems or steps is None or answer is None:
            raise GoalPlanError(problems, completion.text, completion.model)
        request = self._request(answer)
        plan = self.planner.plan(request, nodes=nodes)
        return GoalPlan(
            steps=steps,
            plan=plan,
            model=completion.model,
            fell_back_from=[(a.model, a.reason) for a in completion.fallbacks],
            repaired=repaired,
            body=answer.plan_body(),
            verdict=self.trust.check(goal, shortlist, answer),
            candidates=names,
        )

    # --- the prompt and its budget -------------------------------------------------------------

    def _fit(self, goal: str, shortlist: Shortlist, facts: GoalFacts | None = None) -> tuple[list[dict[str, str]], int]:
        """The messages and the answer's token budget; fewer examples, then fewer candidates, until it fits."""
        context = self.context_size()
        candidates = list(shortlist.candidates)
        while candidates:
            short = Shortlist(shortlist.goal, candidates, shortlist.closest)
            for n_examples in range(len(EXAMPLES), -1, -1):
                messages = build_messages(
                    goal, short, self.catalog, self.templates, examples=EXAMPLES[:n_examples], facts=facts
                )
                room = context - estimate_tokens(messages)
                if room >= MIN_ANSWER_TOKENS:
                    return messages, min(MAX_PLAN_TOKENS, room)
            candidates = candidates[:-1]
        raise PlanTooLong(
            f"plan too long: the goal and the planning prompt do not fit the model's context of {context} tokens",
            None,
        )

    def _trim(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], int]:
        """The repair round's messages: the examples go first when the context runs short."""
        context = self.context_size()
        while True:
            room = context - estimate_tokens(messages)
            if room >= MIN_ANSWER_TOKENS:
                return messages, min(MAX_PLAN_TOKENS, room)
            if len(messages) > 4 and messages[1]["role"] == "user" and messages[2]["role"] == "assistant":
                messages = [messages[0], *messages[3:]]  # drop one example pair
                continue
            raise PlanTooLong(
                f"plan too long: the repair round does not fit the model's context of {context} tokens", None
            )

    def _complete(self, messages: list[dict[str, str]], max_tokens: int, schema: dict[str, Any]) -> Any:
        try:
            return self.models.complete(TASK_TYPE, messages, max_tokens=max_tokens, json_schema=schema)
        except NoModelAvailable as exc:
            overflow = [a for a in exc.attempts if a.reason == REASON_CONTEXT]
            if overflow:
                raise PlanTooLong(
                    f"plan too long for the planning model's context ({overflow[0].detail})", overflow[0].model
                ) from None
            raise

    # --- reading the answer --------------------------------------------------------------------

    def _read(
        self, text: str, finish: str | None, max_tokens: int, nodes: list[NodeInfo], model: str
    ) -> tuple[Answer | None, list[Problem], list[StepSpec] | None]:
        if finish == "length":
            raise PlanTooLong(f"plan too long: the model's answer did not end within {max_tokens} tokens", model)
        try:
            answer = decode(json.loads(text))
        except json.JSONDecodeError as exc:
            return None, [("plan", f"not valid JSON: {exc}")], None
        except AnswerError as exc:
            return None, [(exc.field, exc.reason)], None
        if answer.refuse is not None:
            raise GoalRefused(answer.refuse, model, [])
        try:
            request = self._request(answer)
        except ValidationError as exc:
            return answer, pydantic_problems(exc, "plan"), None
        try:
            steps = self.planner.expand(request)
            self.planner.plan(request, nodes=nodes)
        except PlanError as exc:
            return answer, [(f"plan.{f}", r) for f, r in exc.problems], None
        if problems := self._ref_problems(steps):
            return answer, problems, None
        return answer, [], steps

    @staticmethod
    def _request(answer: Answer) -> JobRequest:
        if answer.template is not None:
            return JobRequest(template=answer.template, inputs=answer.inputs)
        return JobRequest.model_validate({"steps": answer.steps})

    def _ref_problems(self, steps: list[StepSpec]) -> list[Problem]:
        """A `$ref` to an output key its step's action does not declare (the planner cannot know)."""
        by_id = {s.id: s for s in steps}
        problems: list[Problem] = []
        for i, step in enumerate(steps):
            try:
                refs = find_refs(step.args, base=f"plan.steps.{i}.args")
            except RefError as exc:
                problems.append((exc.field, exc.reason))
                continue
            for ref in refs:
                source = by_id.get(ref.step)
                plugin = self.catalog.get(source.plugin) if source else None
                action = plugin.manifest.actions.get(source.action) if plugin and source else None
                declared = (action.output_schema or {}).get("properties") if action else None
                key = ref.path[0] if ref.path else None
                if isinstance(declared, dict) and declared and key is not None and key not in declared:
                    problems.append(
                        (ref.field, f"step {ref.step!r} has no output {key!r} (it has: {', '.join(declared)})")
                    )
        return problems
