"""Flower, started against the test cluster's Redis, lists the workers and the subtasks by name."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Cluster, free_port, stop_process, wait_until

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        importlib.util.find_spec("flower") is None, reason="flower is not installed (pip install 'edgefleet[flower]')"
    ),
]


def _get(url: str) -> Any:
    try:
        response = httpx.get(url, timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text


def test_flower_lists_workers_and_named_subtasks(cluster_factory: Callable[..., Cluster], tmp_path: Path) -> None:
    cluster = cluster_factory(EDGEFLEET_TASK_EVENTS="true")
    cluster.start_router()
    port = free_port()
    flower = f"http://127.0.0.1:{port}"
    env = {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "edgefleet.flower_app",
            "--broker",
            cluster.redis.url,
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
        ],
        env=env,
        stdout=open(tmp_path / "flower.log", "ab"),  # noqa: SIM115 - the process holds it
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: _get(f"{flower}/healthcheck") is not None or None, 60, interval=0.3, what="flower")
        cluster.start_node("flowernode")
        cluster.wait_nodes_ready("flowernode")
        for i in range(2):
            job = cluster.submit(
                {
                    "steps": [
                        {"id": "count", "plugin": "text", "action": "count", "args": {"text": f"x y {i}"}},
                        {
                            "id": "shout",
                            "plugin": "text",
                            "action": "transform",
                            "args": {"text": "hello", "op": "upper"},
                            "needs": ["count"],
                        },
                    ]
                }
            )
            assert cluster.wait_job(job["id"])["state"] == "succeeded"

        def workers() -> dict[str, Any] | None:
            found = _get(f"{flower}/api/workers?refresh=1") or {}
            return found if {"cpu@flowernode", "io@flowernode"} <= set(found) else None

        try:
            listed = wait_until(workers, 60, interval=0.5, what="flower's worker list")
        except AssertionError:
            raise AssertionError(
                f"workers: {_get(flower + '/api/workers')!r}; tasks: {str(_get(flower + '/api/tasks'))[:1500]}; "
                f"log: {(tmp_path / 'flower.log').read_text()[-2000:]}"
            ) from None
        assert "cpu@flowernode" in listed

        def tasks() -> dict[str, Any] | None:
            found = _get(f"{flower}/api/tasks") or {}
            names = [t.get("name") for t in found.values()]
            return found if names.count("text.count") >= 2 and names.count("text.transform") >= 2 else None

        listed_tasks = wait_until(tasks, 60, interval=0.5, what="flower's task list")
        succeeded = [t for t in listed_tasks.values() if t.get("name") == "text.count"]
        assert all(t["state"] == "SUCCESS" for t in succeeded) or wait_until(
            lambda: all(
                t["state"] == "SUCCESS"
                for t in (_get(f"{flower}/api/tasks") or {}).values()
                if t.get("name") == "text.count"
            ),
            30,
            interval=0.5,
            what="tasks succeeded",
        )
        assert {t["worker"] for t in succeeded} <= {"cpu@flowernode"}
    finally:
        stop_process(proc)
