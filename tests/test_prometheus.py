"""A real Prometheus scrapes a real router and worker; the feedback loop reads through it.

Needs the `prometheus` binary (Debian package `prometheus`; .ci/run installs it).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgefleet.cli.side_services import host_port, prometheus_config
from tests.conftest import ADMIN_TOKEN, Cluster, free_port, stop_process, wait_until

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the `prometheus` binary is not installed (apt-get install prometheus; .ci/run does)",
)

FEEDBACK_KEY = "ef:scheduler:feedback"


def _feedback(cluster: Cluster) -> dict[str, str]:
    return cluster.redis.client().hgetall(FEEDBACK_KEY)


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def _targets_up(prom: str) -> list[dict[str, Any]] | None:
    try:
        active = httpx.get(f"{prom}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    except httpx.HTTPError:
        return None
    return active if len(active) == 2 and all(t["health"] == "up" for t in active) else None


def test_grafana_dashboard_and_provisioning_are_valid() -> None:
    import yaml

    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/edgefleet.json").read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for word in ("queues", "latency", "throughput", "node resources", "tokens/s", "weights"):
        assert word in titles, word
    assert all(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    providers = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/edgefleet.yml").read_text())
    assert providers["providers"][0]["options"]["path"]
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert {j["job_name"] for j in scrape["scrape_configs"]} == {"edgefleet-router", "edgefleet-workers", "flower"}


@needs_prometheus
def test_feedback_loop_reads_prometheus_and_falls_back_to_redis(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    prom_port = free_port()
    prom = f"http://127.0.0.1:{prom_port}"
    # The router believes in 5 cpu slots per node (its own cpu_concurrency, what it falls back to
    # without Prometheus); the node really runs 2, which only its metrics tell.
    cluster = cluster_factory(
        EDGEFLEET_PROMETHEUS_URL=prom, EDGEFLEET_FEEDBACK_INTERVAL="0.5", EDGEFLEET_CPU_CONCURRENCY="5"
    )
    cluster.start_router()
    cluster.env_overrides["EDGEFLEET_CPU_CONCURRENCY"] = "2"
    cluster.start_node("promnode")
    cluster.wait_nodes_ready("promnode")
    with cluster.client() as http:
        node = http.get("/v1/workers").json()[0]
    assert node["metrics_url"]

    # Before Prometheus runs, the loop says it fell back and why.
    wait_until(
        lambda: json.loads(_feedback(cluster).get("figures") or "{}").get("slots"),
        30,
        what="feedback round without Prometheus",
    )
    before = _feedback(cluster)
    assert before["source"] == "redis" and "unreachable" in before["reason"]
    assert json.loads(before["targets"])["cpu"] > 4  # from the 5 slots it assumes

    token_file = tmp_path / "router.token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        prometheus_config(host_port(cluster.url), token_file, [host_port(node["metrics_url"])], scrape_interval="1s")
    )
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=open(tmp_path / "prometheus.log", "ab"),  # noqa: SIM115 - the process holds it
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        for i in range(3):
            job = cluster.submit(
                {
                    "priority": "interactive",
                    "steps": [{"id": "count", "plugin": "text", "action": "count", "args": {"text": f"a b c {i}"}}],
                }
            )
            assert cluster.wait_job(job["id"])["state"] == "succeeded"

        targets = wait_until(lambda: _targets_up(prom), 60, interval=0.5, what="both targets up")
        assert {t["labels"]["job"] for t in targets} == {"edgefleet-router", "edgefleet-workers"}
        wait_until(
            lambda: _query(prom, 'edgefleet_jobs_submitted_total{priority="interactive"}'),
            30,
            interval=0.5,
            what="router series",
        )
        wait_until(lambda: _query(prom, "edgefleet_worker_subtasks_total"), 30, interval=0.5, what="worker series")
        wait_until(lambda: _query(prom, "edgefleet_node_slots"), 30, interval=0.5, what="node gauges")
        names = {s["metric"]["__name__"] for s in _query(prom, '{__name__=~"edgefleet_.+|celery_.+"}')}
        assert {
            "edgefleet_backlog_depth",
            "edgefleet_node_memory_total_bytes",
            "celery_queue_length",
            "celery_task_succeeded_total",
        } <= names

        # The loop now reads Prometheus and sets the cpu target from the node's 2 slots (default 16).
        wait_until(lambda: _feedback(cluster).get("source") == "prometheus", 30, what="feedback from Prometheus")
        feedback = _feedback(cluster)
        figures = json.loads(feedback["figures"])
        assert figures["slots"]["cpu"] == 2
        assert 2 <= json.loads(feedback["targets"])["cpu"] <= 4
        changes = json.loads(feedback.get("changes") or "[]")
        assert any(
            c["kind"] == "target_depth"
            and c["resource_class"] == "cpu"
            and c["reason"].startswith("prometheus")
            and c["from"] > 4
            and c["to"] <= 4
            for c in changes
        ), changes
        wait_until(
            lambda: _query(prom, 'edgefleet_scheduler_target_depth{resource_class="cpu"}'),
            30,
            interval=0.5,
            what="decision metric",
        )
    finally:
        stop_process(proc, signal.SIGKILL)

    wait_until(lambda: _feedback(cluster).get("source") == "redis", 30, what="fallback to Redis")
    feedback = _feedback(cluster)
    assert "unreachable" in feedback["reason"] and prom in feedback["reason"]
    assert json.loads(feedback["figures"])["slots"]["cpu"] == 5
