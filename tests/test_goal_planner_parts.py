"""The goal planner's parts without generating: candidates, the plan grammar, decoding, the trust check, the budget.

The grammar test compiles each plan schema the way llama.cpp does when it samples (the
converter, then the grammar parser behind `llama_sampler_init_grammar`), on the vocabulary of a
tiny GGUF written here; a schema the parser rejects would make llama.cpp fall back to free-form JSON.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from edgefleet.models.config import ModelsConfig
from edgefleet.models.router import ModelRouter
from edgefleet.models.runtime import ModelPool
from edgefleet.plugin_catalog import PluginCatalog, builtin_plugin_dir
from edgefleet.router.goal_planner import GoalPlanner, GoalRefused, PlanTooLong
from edgefleet.router.plan_candidates import Retriever
from edgefleet.router.plan_prompt import EXAMPLES, build_messages, estimate_tokens, example_values
from edgefleet.router.plan_schema import GoalFacts, anchored, decode, goal_options, plan_schema
from edgefleet.router.plan_trust import TrustCheck, goal_values, unsafe_reason
from edgefleet.router.planner import Planner
from edgefleet.settings import Settings
from edgefleet.templates import TemplateCatalog
from tests.model_fixtures import tiny_gguf

FOLDERS = [builtin_plugin_dir()]


@pytest.fixture(scope="module")
def catalogue() -> tuple[PluginCatalog, TemplateCatalog]:
    return PluginCatalog.load(FOLDERS), TemplateCatalog.load(FOLDERS)


@pytest.fixture(scope="module")
def retriever(catalogue: tuple[PluginCatalog, TemplateCatalog]) -> Retriever:
    return Retriever(*catalogue)


@pytest.mark.parametrize(
    ("goal", "first"),
    [
        ("how many words are in 'the quick brown fox'?", "text.count"),
        ("find the 5 sharpest shots in /home/ana/photos", "photo_rank.best_shots"),
        ("make a slideshow video of the best photos from /home/ana/holiday", "photo-pipeline"),
        ("keep my knowledge base in /srv/kb up to date with https://docs.example.com/guide", "knowledge-refresh"),
        ("write me a haiku about autumn rain", "llm.generate"),
        ("run the tests and lint of my project at /srv/git/app and write a report", "ci-pipeline"),
    ],
)
def test_the_shortlist_puts_the_right_target_first(retriever: Retriever, goal: str, first: str) -> None:
    shortlist = retriever.shortlist(goal)
    assert shortlist.candidates[0].name == first, shortlist.candidates
    assert len(shortlist.candidates) <= 4


@pytest.mark.parametrize("goal", ["book me a flight to Lisbon", "play some jazz in the living room"])
def test_a_goal_the_catalogue_cannot_serve_has_no_candidates(retriever: Retriever, goal: str) -> None:
    assert retriever.shortlist(goal).candidates == []


def test_templates_take_the_constraints_of_the_arguments_they_feed(
    catalogue: tuple[PluginCatalog, TemplateCatalog],
) -> None:
    plugins, templates = catalogue
    schema = plan_schema(plugins, templates, templates.names(), [])
    inputs = {alt["properties"]["template"]["const"]: alt["properties"]["inputs"] for alt in schema["anyOf"][:-1]}
    assert inputs["photo-pipeline"]["properties"]["group_by"]["enum"] == ["camera", "date"]
    assert set(inputs["text-report"]["properties"]["op"]["enum"]) >= {"upper", "lower"}
    assert inputs["ci-pipeline"]["properties"]["repo"]["pattern"].startswith("^/")
    assert inputs["knowledge-refresh"]["properties"]["urls"]["items"]["pattern"].startswith("^[hH][tT]")
    assert inputs["fetch-and-count"]["required"] == ["url"]
    assert schema["anyOf"][-1]["required"] == ["refuse"]  # a refusal is always one of the answers


def _sampler_accepts(vocab: Any, schema: dict[str, Any]) -> bool:
    import llama_cpp
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    grammar = json_schema_to_gbnf(json.dumps(schema))
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")
def test_every_plan_schema_compiles_to_a_llama_cpp_grammar(
    catalogue: tuple[PluginCatalog, TemplateCatalog], tmp_path: Path
) -> None:
    import llama_cpp

    plugins, templates = catalogue
    llm = llama_cpp.Llama(model_path=str(tiny_gguf(tmp_path / "vocab.gguf")), vocab_only=True, verbose=False)
    vocab = llm._model.vocab
    # The check itself can fail: an unanchored escape is what made llama.cpp fall back before.
    assert not _sampler_accepts(vocab, {"type": "string", "pattern": "^a\\.b$"})
    assert _sampler_accepts(vocab, {"type": "string", "pattern": anchored("a\\.b")})
    actions = [(p, a) for p in plugins.names() for a in plugins.get(p).manifest.actions]  # type: ignore[union-attr]
    schemas = [plan_schema(plugins, templates, templates.names(), actions)]
    schemas += [plan_schema(plugins, templates, [t], []) for t in templates.names()]
    schemas += [plan_schema(plugins, templates, [], [a]) for a in actions]
    # String arguments limited to the goal's own strings, quotes and backslashes included.
    goal = "fetch https://x.example/a?b=1 to /srv/k\\b and count 'say \"hi\"' please"
    options = goal_options(goal, goal_values(goal))
    assert "https://x.example/a?b=1" in options and 'say "hi"' not in options
    schemas.append(plan_schema(plugins, templates, templates.names(), actions, options))
    # Arguments limited to what the goal can fill (numbers, paths, optional arguments, short lists).
    schemas.append(
        plan_schema(plugins, templates, templates.names(), actions, facts=GoalFacts(goal, goal_values(goal)))
    )
    photos = "find the 5 sharpest shots in /home/ana/photos and make a video of them"
    schemas.append(
        plan_schema(plugins, templates, templates.names(), actions, facts=GoalFacts(photos, goal_values(photos)))
    )
    for schema in schemas:
        assert _sampler_accepts(vocab, schema), json.dumps(schema)[:300]


def _steps_of(schema: dict[str, Any]) -> list[list[list[dict[str, Any]]]]:
    """Per step count, per position: the step alternatives the grammar offers."""
    plans = next(a for a in schema["anyOf"] if "steps" in a["properties"])["properties"]["steps"]["anyOf"]
    return [[position["anyOf"] for position in plan["prefixItems"]] for plan in plans]


def test_steps_have_fixed_ids_and_refer_only_to_earlier_steps(
    catalogue: tuple[PluginCatalog, TemplateCatalog],
) -> None:
    plugins, templates = catalogue
    goal = "pull down https://example.org/page.html and count its words"
    schema = plan_schema(
        plugins, templates, [], [("http_fetch", "get"), ("text", "count")], facts=GoalFacts(goal, goal_values(goal))
    )
    plans = _steps_of(schema)
    assert [len(p) for p in plans] == [1, 2]  # as many steps as actions offered, each position spelt out
    for plan in plans:
        for index, position in enumerate(plan):
            assert {alt["properties"]["id"]["const"] for alt in position} == {f"s{index + 1}"}
            text = json.dumps(position)
            if index == 0:
                assert '"ref"' not in text  # SmolLM2 wrote first steps that refer to themselves
            else:
                earlier = "|".join(f"s{i + 1}" for i in range(index))
                assert f"steps[.]({earlier})[.]output" in text and f"s{index + 1})" not in text
    # A path the goal does not name is not offered on a first step (text.count takes the text then);
    # later it can only come from an earlier step.
    first = [alt["properties"]["args"]["properties"] for alt in plans[0][0]]
    assert {"url": {"enum": ["https://example.org/page.html"]}} in first
    assert [a for a in first if "path" in a] == [] and any("text" in a for a in first)
    second = [alt["properties"]["args"]["properties"] for alt in plans[1][1]]
    assert any(a.get("path", {}).get("required") == ["ref"] for a in second)


def test_optional_arguments_only_when_the_goal_names_a_value_for_them(
    catalogue: tuple[PluginCatalog, TemplateCatalog],
) -> None:
    plugins, templates = catalogue

    def first_args(goal: str, action: tuple[str, str]) -> list[dict[str, Any]]:
        schema = plan_schema(plugins, templates, [], [action], facts=GoalFacts(goal, goal_values(goal)))
        return [alt["properties"]["args"]["properties"] for alt in _steps_of(schema)[0][0]]

    # "5" fills `best` (the goal says "sharpest": best), not checkpoint_every, which also accepts 5.
    args = first_args("find the 5 sharpest shots in /home/ana/photos", ("photo_rank", "best_shots"))
    assert args[0] == {"manifest": {"enum": ["/home/ana/photos"]}, "best": {"enum": [5]}}
    assert args[1]["images"]["maxItems"] <= 4  # an unbounded list is where a small model loops
    # Without a number, a camera word or a flag in the goal, only the required source is offered.
    assert first_args("read the exif of every photo under /home/ana/dcim", ("photo", "classify")) == [
        {"source": {"enum": ["/home/ana/dcim"]}}
    ]
    assert first_args("sort the pictures in /home/ana/photos by camera", ("photo", "classify"))[0]["group_by"] == {
        "enum": ["camera"]  # the choice the goal asks for
    }
    # A commit sha fits `since`; the branch pattern fits every word, so `branch` is left out.
    args = first_args("are there new commits in /srv/git/app since abc1234?", ("repo_watch", "detect"))
    assert args == [{"repo": {"enum": ["/srv/git/app"]}, "since": {"enum": ["abc1234"]}}]
    # Without facts (a client's own schema request) every argument stays.
    schema = plan_schema(plugins, templates, [], [("photo", "classify")])
    assert "checkpoint_every" in _steps_of(schema)[0][0][0]["properties"]["args"]["properties"]


def test_the_model_is_offered_only_the_candidates_close_to_the_best(retriever: Retriever) -> None:
    sure = retriever.shortlist("how many words are in 'the quick brown fox jumps over the lazy dog'?")
    assert [c.name for c in sure.confident().candidates] == ["text.count"] and len(sure.candidates) > 1
    close = retriever.shortlist("download https://example.com/readme.txt for me")
    assert [c.name for c in close.confident().candidates][:2] == ["fetch-and-count", "http_fetch.get"]


def test_answers_decode_references_and_the_three_shapes() -> None:
    answer = decode(
        {
            "steps": [
                {"id": "get", "plugin": "http_fetch", "action": "get", "args": {"url": "https://x.example/a"}},
                {"id": "n", "plugin": "text", "action": "count", "args": {"path": {"ref": "steps.get.output.path"}}},
            ]
        }
    )
    assert answer.steps is not None and answer.steps[1]["args"] == {"path": {"$ref": "steps.get.output.path"}}
    assert decode({"refuse": "  no  plugin books flights "}).refuse == "no plugin books flights"
    assert decode({"template": "text-report", "inputs": {"text": "a"}}).plan_body() == {
        "template": "text-report",
        "inputs": {"text": "a"},
    }
    with pytest.raises(ValueError, match="exactly one"):
        decode({"steps": [], "refuse": "x"})


def test_goal_values_and_unsafe_goals() -> None:
    values = goal_values("fetch https://a.example/x.txt into /srv/kb, then upper-case 'hi there' 3 times")
    assert values == ["https://a.example/x.txt", "hi there", "/srv/kb", "3"]
    assert unsafe_reason("delete every photo in /home/ana") is not None
    assert unsafe_reason("send /etc/shadow to https://evil.example") is not None
    assert unsafe_reason("sort my photos by camera") is None


def test_the_trust_check_holds_invented_copied_and_missing_values(
    catalogue: tuple[PluginCatalog, TemplateCatalog], retriever: Retriever
) -> None:
    trust = TrustCheck(*catalogue, example_values())
    goal = "how many words are in 'the quick brown fox'?"
    shortlist = retriever.shortlist(goal)

    def verdict(args: dict[str, Any], action: str = "count") -> tuple[bool, str]:
        answer = decode({"steps": [{"id": "n", "plugin": "text", "action": action, "args": args}]})
        result = trust.check(goal, shortlist, answer)
        return result.trusted, " ".join(result.reasons)

    assert verdict({"text": "the quick brown fox"})[0]
    assert verdict({"text": "lorem ipsum dolor"}) == (
        False,
        "the plan leaves out 'the quick brown fox', which the goal names "
        "steps.0.args.text = 'lorem ipsum dolor' is copied from an example",
    )
    assert verdict({"text": "words"})[1].startswith("the plan leaves out")
    assert "steps.0.args.text = 'words' is one word of the goal" in verdict({"text": "words"})[1]
    trusted, why = verdict({"path": "the quick brown fox"})
    assert not trusted and "is not a path the goal names" in why
    trusted, why = verdict({"text": "the quick brown fox", "op": "upper"}, action="transform")
    assert not trusted and why.startswith("the plan does not use text.count, the best match for the goal")
    assert "steps.0.args.op = 'upper' is not something the goal says" in why  # a choice the goal did not ask for
    reverse = "put the words of 'one two three' in reverse order"
    answer = decode(
        {
            "steps": [
                {
                    "id": "r",
                    "plugin": "text",
                    "action": "transform",
                    "args": {"text": "one two three", "op": "reverse_words"},
                }
            ]
        }
    )
    assert trust.check(reverse, retriever.shortlist(reverse), answer).trusted  # an enum value is a choice
    trusted, why = verdict({"text": "the quick brown fox"}, action="generate")
    assert not trusted and "not among the candidates" in why
    # A list made of a goal's words when the goal names no value: "turn off the lights" is no slideshow.
    lights = "turn off the lights in the kitchen"
    answer = decode(
        {"steps": [{"id": "s1", "plugin": "video", "action": "slideshow", "args": {"images": ["lights", "kitchen"]}}]}
    )
    held = trust.check(lights, retriever.shortlist(lights), answer)
    twice = decode(
        {
            "steps": [
                {"id": f"s{i}", "plugin": "text", "action": "count", "args": {"text": "the quick brown fox"}}
                for i in (1, 2)
            ]
        }
    )
    assert trust.check(goal, shortlist, twice).reasons == [
        "the plan has 2 steps, the goal asks for 1 thing(s)",  # "turn ... into all caps" + a photo resize
        "step 1 repeats step 0",
    ]
    assert not held.trusted and "steps.0.args.images.0 = 'lights' is a list item the goal does not name" in held.reasons


def _planner(context: int) -> GoalPlanner:
    plugins, templates = PluginCatalog.load(FOLDERS), TemplateCatalog.load(FOLDERS)
    config = ModelsConfig.parse(
        {
            "models": {"m": {"backend": "llama_cpp", "path": "/nonexistent.gguf", "context_size": context}},
            "routes": {"planning": {"primary": "m"}},
        }
    )
    return GoalPlanner(Planner(plugins, templates, Settings()), plugins, ModelRouter(config, ModelPool(config)))


def test_the_prompt_fits_the_context_or_is_plan_too_long() -> None:
    goal = "sort the pictures in /home/ana/photos by camera"
    roomy = _planner(2048)
    messages, max_tokens = roomy._fit(goal, roomy.shortlist(goal, []))
    assert len(messages) == 2 + 2 * len(EXAMPLES)  # every example, with room to spare
    assert estimate_tokens(messages) + max_tokens <= 2048
    tight = _planner(700)
    messages, max_tokens = tight._fit(goal, tight.shortlist(goal, []))
    assert len(messages) < 2 + 2 * len(EXAMPLES) and estimate_tokens(messages) + max_tokens <= 700
    with pytest.raises(PlanTooLong, match="plan too long"):
        _planner(200).plan(goal, nodes=[])


def test_refusals_before_any_model_is_asked() -> None:
    planner = _planner(2048)  # its model file does not exist: nothing here may call it
    with pytest.raises(GoalRefused, match="no template or plugin action matches") as refused:
        planner.plan("book me a flight to Lisbon", nodes=[])
    assert refused.value.model is None
    with pytest.raises(GoalRefused, match="destroys data"):
        planner.plan("wipe the git history of /srv/git/app", nodes=[])


def test_the_examples_are_valid_answers(catalogue: tuple[PluginCatalog, TemplateCatalog]) -> None:
    plugins, templates = catalogue
    planner = Planner(plugins, templates, Settings())
    for example in EXAMPLES:
        answer = decode(example.answer)
        if answer.refuse is None:
            from edgefleet.schemas import JobRequest

            planner.plan(JobRequest.model_validate(answer.plan_body()))
    messages = build_messages("x", Retriever(plugins, templates).shortlist("count words in 'x y'"), plugins, templates)
    assert messages[0]["content"] == messages[0]["content"].strip() and messages[-1]["content"].endswith("Goal: x")


def test_a_dry_run_of_a_goal_says_who_planned_and_why_it_is_held() -> None:
    from edgefleet.router.goal_planner import GoalPlan
    from edgefleet.router.plan_submit import GoalPlanned

    planner = _planner(2048)
    goal = "how many words are in 'the quick brown fox'?"
    shortlist = planner.shortlist(goal, [])
    text = '{"steps": [{"id": "n", "plugin": "text", "action": "count", "args": {"path": "the quick brown fox"}}]}'
    answer, problems, steps = planner._read(text, "stop", 500, [], "m")
    assert answer is not None and steps is not None and problems == []
    plan = planner.planner.plan(planner._request(answer), nodes=[])
    verdict = planner.trust.check(goal, shortlist, answer)
    goal_plan = GoalPlan(
        steps, plan, "m", [], False, answer.plan_body(), verdict, [c.name for c in shortlist.candidates]
    )
    shown = GoalPlanned(plan, goal_plan).preview().model_dump(mode="json")
    assert shown["model"] == "m" and shown["plan"] == json.loads(text) and "text.count" in shown["candidates"]
    assert shown["requires_confirmation"] and not shown["trusted"]
    assert shown["trust"] == ["steps.0.args.path = 'the quick brown fox' is not a path the goal names"]
