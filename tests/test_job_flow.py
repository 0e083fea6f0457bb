"""A job runs end to end on real processes: DAG order, outputs passed along, queues by class."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, Cluster, new_marker

pytestmark = pytest.mark.cluster


def test_three_step_dag_across_io_and_cpu(shared_cluster: Cluster, http_site: str) -> None:
    body = {
        "name": "fetch, count, shout",
        "steps": [
            {"id": "fetch", "plugin": "http_fetch", "action": "get", "args": {"url": f"{http_site}/page.txt"}},
            {
                "id": "count",
                "plugin": "text",
                "action": "count",
                "args": {"path": {"$ref": "steps.fetch.output.path"}},
            },
            {
                "id": "shout",
                "plugin": "text",
                "action": "transform",
                "args": {"path": {"$ref": "steps.fetch.output.path"}, "op": "upper"},
                "needs": ["count"],
            },
        ],
    }
    job = shared_cluster.submit(body)
    assert job["state"] == "running"
    done = shared_cluster.wait_job(job["id"])
    assert done["state"] == "succeeded", done
    steps = {st["id"]: st for st in done["subtasks"]}
    assert steps["count"]["needs"] == ["fetch"]  # the $ref made the dependency
    assert steps["fetch"]["queue"] == "io" and steps["fetch"]["resource_class"] == "io"
    assert steps["count"]["queue"] == "cpu" and steps["shout"]["queue"] == "cpu"
    assert steps["fetch"]["output"]["status"] == 200
    assert steps["count"]["output"]["words"] == 11
    assert "THE QUICK BROWN FOX" in steps["shout"]["output"]["text"]
    assert steps["count"]["started_at"] >= steps["fetch"]["finished_at"]
    assert steps["shout"]["started_at"] >= steps["count"]["finished_at"]
    assert all(st["attempt"] == 1 and st["node"] == "shared" for st in steps.values())


def test_template_job_runs(shared_cluster: Cluster) -> None:
    job = shared_cluster.submit({"template": "text-report", "inputs": {"text": "a b c a", "op": "upper"}})
    done = shared_cluster.wait_job(job["id"])
    assert done["state"] == "succeeded", done
    outputs = {st["id"]: st["output"] for st in done["subtasks"]}
    assert outputs["count"]["words"] == 4
    assert outputs["shout"]["text"] == "A B C A"


def test_failing_step_retries_with_backoff_then_fails_the_job(shared_cluster: Cluster, tmp_path: Path) -> None:
    marker = new_marker("runs.txt")
    body = {
        "steps": [
            {
                "id": "flaky",
                "plugin": "sleep",
                "action": "sleep",
                "retries": 2,
                "retry_backoff": 0.2,
                "args": {"seconds": 0, "fail_times": 1, "marker": str(marker)},
            },
            {
                "id": "broken",
                "plugin": "sleep",
                "action": "sleep",
                "retries": 1,
                "retry_backoff": 0.1,
                "args": {"seconds": 0, "fail": True},
                "needs": ["flaky"],
            },
            {"id": "never", "plugin": "text", "action": "count", "args": {"text": "x"}, "needs": ["broken"]},
        ]
    }
    done = shared_cluster.wait_job(shared_cluster.submit(body)["id"])
    steps = {st["id"]: st for st in done["subtasks"]}
    assert steps["flaky"]["state"] == "succeeded" and steps["flaky"]["attempt"] == 2
    assert len(marker.read_text().splitlines()) == 2
    assert steps["broken"]["state"] == "failed" and steps["broken"]["attempt"] == 2
    assert "asked to fail" in steps["broken"]["error"]
    assert steps["never"]["state"] == "cancelled"
    assert done["state"] == "failed"
    assert done["failed_subtask"] == "broken"
    assert "broken" in done["error"] and "2 attempt" in done["error"]


def test_a_callback_to_the_routers_own_host_is_refused(shared_cluster: Cluster) -> None:
    # Delivery itself (signed, retried, durable) is tests/test_webhooks.py's, with an admin's allowance
    # for its receiver on 127.0.0.1; without one, a loopback callback is an SSRF attempt.
    with shared_cluster.client() as http:
        response = http.post(
            "/v1/jobs",
            json={
                "steps": [{"id": "a", "plugin": "text", "action": "count", "args": {"text": "x y"}}],
                "callback_url": "http://127.0.0.1:9/hook",
            },
        )
    assert response.status_code == 422, response.text
    assert [d["field"] for d in response.json()["detail"]] == ["callback_url"]


def test_workers_and_plugins_are_listed(shared_cluster: Cluster) -> None:
    # One subtask of its own, so that the node's per-subtask series exist whatever ran before.
    job = shared_cluster.submit({"steps": [{"id": "c", "plugin": "text", "action": "count", "args": {"text": "a b"}}]})
    assert shared_cluster.wait_job(job["id"])["state"] == "succeeded"
    with shared_cluster.client(ADMIN_TOKEN) as http:
        nodes = http.get("/v1/workers").json()
        plugins = http.get("/v1/plugins").json()
        metrics = http.get("/metrics")
    assert [n["name"] for n in nodes] == ["shared"]
    assert set(nodes[0]["classes"]) == {"cpu", "io"}
    assert {"text", "http_fetch", "sleep"} <= {p["name"] for p in plugins["plugins"]}
    builtins = {p["name"]: p for p in plugins["plugins"] if p["name"] in ("text", "http_fetch", "sleep")}
    assert all("shared" in p["nodes"] for p in builtins.values())
    assert "edgefleet_backlog_depth" in metrics.text
    node_metrics = httpx.get(nodes[0]["metrics_url"]).text
    assert "edgefleet_worker_subtasks_total" in node_metrics
