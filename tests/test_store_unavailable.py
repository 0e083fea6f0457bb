"""While Redis is down the API answers a JSON 503 `store_unavailable` with Retry-After, never a
plain-text 500; once Redis is back (same port, its append-only file) everything works again.

Real parts: a redis-server killed with SIGKILL by its PID and started again, a router process.
"""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from tests.conftest import Cluster, RedisServer, wait_until

pytestmark = pytest.mark.cluster

JOB = {"steps": [{"id": "a", "plugin": "text", "action": "count", "args": {"text": "a b"}}]}


def _kill(server: RedisServer) -> None:
    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)


def _assert_store_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    assert int(response.headers["retry-after"]) > 0
    body = response.json()
    assert body["error"] == "store_unavailable", body
    assert [set(item) for item in body["detail"]] == [{"field", "reason"}], body
    assert "Traceback" not in response.text and "redis.exceptions" not in response.text


def test_api_answers_503_while_redis_is_down_and_recovers(router_only: Cluster, redis_server: RedisServer) -> None:
    with router_only.client() as http:
        before = http.post("/v1/jobs", json=JOB)
        assert before.status_code == 201, before.text
        job_id = before.json()["id"]

        _kill(redis_server)
        _assert_store_unavailable(http.post("/v1/jobs", json=JOB))
        _assert_store_unavailable(http.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "during-outage"}))
        _assert_store_unavailable(http.get(f"/v1/jobs/{job_id}"))
        _assert_store_unavailable(http.get("/v1/jobs"))
        _assert_store_unavailable(http.delete(f"/v1/jobs/{job_id}"))
        _assert_store_unavailable(http.get(f"/v1/jobs/{job_id}/events"))
        health = http.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        # Input errors that need no Redis are still told apart from the outage.
        assert http.post("/v1/jobs", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415

        redis_server.start()  # same port, same append-only file
        wait_until(lambda: http.get("/healthz").status_code == 200, 30, interval=0.2, what="router healthy again")
        after = http.post("/v1/jobs", json=JOB)
        assert after.status_code == 201, after.text
        assert after.json()["id"] != job_id
        # The job accepted before the outage survived it (append-only file), and is still running.
        assert http.get(f"/v1/jobs/{job_id}").json()["state"] == "running"
        listed = [job["id"] for job in http.get("/v1/jobs").json()["jobs"]]
        assert listed == [after.json()["id"], job_id]
    assert router_only.router_proc is not None and router_only.router_proc.poll() is None
