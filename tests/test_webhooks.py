"""Webhooks end to end: real redis-server, router(s), a worker node and a real receiver on 127.0.0.1.

The receiver listens on loopback, so the stack's router allows 127.0.0.1/32 (and only
that); the last test restarts it without the allowance to see loopback refused.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook

from tests.conftest import ADMIN_TOKEN, Cluster, RedisServer, free_port, serving, wait_until

pytestmark = pytest.mark.cluster

ALLOW_LOOPBACK = {
    "EDGEFLEET_WEBHOOK_ALLOWED_NETWORKS": '["127.0.0.1/32"]',
    "EDGEFLEET_WEBHOOK_BACKOFF": "0.3",
    "EDGEFLEET_WEBHOOK_TIMEOUT": "30",
    "EDGEFLEET_CALLBACK_ATTEMPTS": "5",
}
HANG = 0  # a scripted status meaning: hold the request until released


def quick_job(callback_url: str) -> dict[str, Any]:
    return {
        "steps": [{"id": "a", "plugin": "text", "action": "count", "args": {"text": "x y"}}],
        "callback_url": callback_url,
    }


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    hanging_then: int  # requests held by the receiver when this one arrived


@dataclass
class Receiver:
    """Records every POST; answers each path from its script (the last entry repeats)."""

    scripts: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    hanging: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    script = receiver.scripts.get(self.path, [(200, {})])
                    status, headers = script.pop(0) if len(script) > 1 else script[0]
                    receiver.hits.append(Hit(self.path, dict(self.headers), body, status, receiver.hanging))
                    if status == HANG:
                        receiver.hanging += 1
                if status == HANG:
                    receiver.release.wait(60)
                    with receiver.lock:
                        receiver.hanging -= 1
                    status = 503
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        return Handler

    def at(self, path: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.path == path]


@dataclass
class Stack:
    redis: RedisServer
    cluster: Cluster
    receiver: Receiver
    url: str  # the receiver's base URL

    def record(self, job_id: str) -> dict[str, str]:
        return self.redis.client().hgetall(f"ef:webhook:msg_{job_id}")

    def wait_record(self, job_id: str, state: str, timeout: float = 30) -> dict[str, str]:
        return wait_until(
            lambda: (r := self.record(job_id)).get("state") == state and r,
            timeout,
            what=f"webhook of {job_id} {state}; router: {self.cluster.log_tail('router', 1500)}",
        )


def callbacks_counted(cluster: Cluster, outcome: str) -> float:
    with cluster.client(ADMIN_TOKEN) as http:
        text = http.get("/metrics").text
    match = re.search(rf'^edgefleet_callbacks_total\{{outcome="{outcome}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("webhooks")
    server = RedisServer(port=free_port(), data_dir=workdir / "redis")
    server.start()
    cluster = Cluster(redis=server, workdir=workdir, env_overrides=dict(ALLOW_LOOPBACK))
    receiver = Receiver()
    try:
        cluster.start_router()
        cluster.start_node("wh")
        cluster.wait_nodes_ready("wh")
        with serving(receiver.handler()) as url:
            yield Stack(server, cluster, receiver, url)
            receiver.release.set()
    finally:
        cluster.stop()
        server.stop()


def test_submit_refuses_oversized_and_own_addresses_even_with_loopback_allowed(stack: Stack) -> None:
    redis_port, router_port = stack.redis.port, stack.cluster.router_port
    refused = {
        "http://example.com/" + "a" * 100_000: "longer than 2048",
        f"http://127.0.0.1:{redis_port}/": "cluster's own",
        f"http://localhost:{redis_port}/": "cluster's own",
        f"http://127.0.0.1:{router_port}/v1/jobs": "cluster's own",
        f"http://2130706433:{router_port}/": "cluster's own",
        "http://127.0.0.2/": "loopback",  # only 127.0.0.1/32 is allowed
        "http://[::1]/": "loopback",
        "http://169.254.169.254/latest/meta-data/": "link-local",
        "http://10.0.0.1/": "private",
    }
    with stack.cluster.client("alice-token") as http:
        for url, reason in refused.items():
            answer = http.post("/v1/jobs", json=quick_job(url))
            assert answer.status_code == 422, (url[:60], answer.text[:300])
            body = answer.json()
            assert body["error"] == "invalid_request"
            assert [d["field"] for d in body["detail"]] == ["callback_url"]
            assert reason in body["detail"][0]["reason"], body
    # Nothing was created by the refused submissions.
    assert not stack.redis.client().keys("ef:job:*")


def test_delivery_is_signed_per_standard_webhooks(stack: Stack) -> None:
    with stack.cluster.client("alice-token") as http:
        secret = http.get("/v1/webhooks/secret").json()
        assert http.get("/v1/webhooks/secret").json()["secret"] == secret["secret"]  # made once, then kept
        assert http.get("/v1/webhooks/secret", params={"tenant": "bob"}).status_code == 403
    with stack.cluster.client("bob-token") as http:
        assert http.get("/v1/webhooks/secret").json()["secret"] != secret["secret"]
    assert secret["secret"].startswith("whsec_") and secret["tenant"] == "alice"

    job = stack.cluster.submit(quick_job(f"{stack.url}/signed"), token="alice-token")
    stack.wait_record(job["id"], "delivered")
    [hit] = stack.receiver.at("/signed")
    headers = {k.lower(): v for k, v in hit.headers.items()}
    assert headers["webhook-id"] == f"msg_{job['id']}"
    assert headers["content-type"] == "application/json"
    payload = Webhook(secret["secret"]).verify(hit.body, headers)
    assert payload["id"] == job["id"] and payload["state"] == "succeeded"
    # Another tenant's secret does not verify it.
    with stack.cluster.client("bob-token") as http:
        bob_secret = http.get("/v1/webhooks/secret").json()["secret"]
    with pytest.raises(Exception, match="signature"):
        Webhook(bob_secret).verify(hit.body, headers)

    # After a rotation deliveries verify with the new secret, and with the old one during the grace.
    with stack.cluster.client("alice-token") as http:
        rotated = http.post("/v1/webhooks/secret/rotate").json()
    assert rotated["secret"] != secret["secret"] and rotated["previous_valid_until"] > time.time()
    job = stack.cluster.submit(quick_job(f"{stack.url}/rotated"), token="alice-token")
    stack.wait_record(job["id"], "delivered")
    [hit] = stack.receiver.at("/rotated")
    for key in (rotated["secret"], secret["secret"]):
        Webhook(key).verify(hit.body, hit.headers)
    log = stack.cluster.log_tail("router", 1_000_000)
    assert secret["secret"] not in log and rotated["secret"] not in log


def test_429_with_retry_after_is_retried_then_delivered(stack: Stack) -> None:
    stack.receiver.scripts["/busy"] = [(429, {"Retry-After": "2"}), (200, {})]
    job = stack.cluster.submit(quick_job(f"{stack.url}/busy"), token="alice-token")
    record = stack.wait_record(job["id"], "delivered")
    first, second = stack.receiver.at("/busy")
    assert (first.status, second.status) == (429, 200)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == f"msg_{job['id']}"
    # The retry waited for Retry-After (2 s), not the 0.3 s backoff: the signed timestamps say so.
    assert int(second.headers["webhook-timestamp"]) - int(first.headers["webhook-timestamp"]) >= 1
    assert record["attempt"] == "2" and record["last_status"] == "200"


def test_hanging_receivers_of_one_tenant_do_not_delay_another(stack: Stack) -> None:
    receiver = stack.receiver
    with contextlib.ExitStack() as servers:
        dead = [servers.enter_context(serving(receiver.handler())) for _ in range(3)]
        for i, _base in enumerate(dead):
            receiver.scripts[f"/dead{i}"] = [(HANG, {})]
        alice_jobs = [
            stack.cluster.submit(quick_job(f"{base}/dead{i}"), token="alice-token") for i, base in enumerate(dead)
        ]
        wait_until(lambda: receiver.hanging == 3, 30, what="alice's three webhooks held by their receivers")
        bob = stack.cluster.submit(quick_job(f"{stack.url}/bob"), token="bob-token")
        try:
            stack.wait_record(bob["id"], "delivered", timeout=20)
            [hit] = receiver.at("/bob")
            # Bob's webhook arrived while all three of alice's were still held...
            assert hit.hanging_then == 3
            # ...and while their deliveries were still pending on their first attempt.
            for job in alice_jobs:
                record = stack.record(job["id"])
                assert (record["state"], record["attempt"]) == ("pending", "1")
        finally:
            receiver.release.set()
        # Released, they answer 503 and are retried, not lost.
        for job in alice_jobs:
            wait_until(lambda j=job: stack.record(j["id"]).get("last_status") == "503", 30, what="retry recorded")


def test_two_routers_deliver_each_webhook_once(stack: Stack, tmp_path: Path) -> None:
    other = Cluster(redis=stack.redis, workdir=tmp_path, env_overrides=dict(ALLOW_LOOPBACK))
    before = callbacks_counted(stack.cluster, "delivered")
    other.start_router()
    try:
        jobs = []
        for i in range(12):
            router = other if i % 2 else stack.cluster
            jobs.append(router.submit(quick_job(f"{stack.url}/two/{i}"), token="bob-token"))
        for job in jobs:
            stack.wait_record(job["id"], "delivered")
        for i, job in enumerate(jobs):
            hits = stack.receiver.at(f"/two/{i}")
            assert [h.headers["webhook-id"] for h in hits] == [f"msg_{job['id']}"]
        counted = callbacks_counted(stack.cluster, "delivered") - before + callbacks_counted(other, "delivered")
        assert counted == len(jobs)
    finally:
        other.stop()


def test_router_killed_during_backoff_delivers_exactly_once_after_restart(stack: Stack) -> None:
    stack.receiver.scripts["/crash"] = [(503, {"Retry-After": "5"}), (200, {})]
    job = stack.cluster.submit(quick_job(f"{stack.url}/crash"), token="alice-token")
    # The first attempt failed and its retry is scheduled: the router is now in the backoff.
    wait_until(lambda: stack.record(job["id"]).get("last_status") == "503", 30, what="first attempt recorded")
    stack.cluster.stop_router(signal.SIGKILL)
    assert [h.status for h in stack.receiver.at("/crash")] == [503]
    record = stack.record(job["id"])
    assert (record["state"], record["attempt"]) == ("pending", "1")

    stack.cluster.start_router()
    record = stack.wait_record(job["id"], "delivered")
    hits = stack.receiver.at("/crash")
    assert [h.status for h in hits] == [503, 200]
    assert {h.headers["webhook-id"] for h in hits} == {f"msg_{job['id']}"}
    assert record["attempt"] == "2"


def test_loopback_is_refused_at_submit_and_at_delivery_without_the_allowance(stack: Stack) -> None:
    cluster = stack.cluster
    # Accepted while loopback is allowed; the job waits (a long step) so it ends after the policy changes.
    slow = {
        "steps": [{"id": "s", "plugin": "sleep", "action": "sleep", "args": {"seconds": 60}}],
        "callback_url": f"{stack.url}/late",
    }
    job = cluster.submit(slow, token="alice-token")
    cluster.stop_router()
    for name in ALLOW_LOOPBACK:
        if "ALLOWED_NETWORKS" in name:
            cluster.env_overrides.pop(name)
    cluster.start_router()

    targets = [
        f"{stack.url}/x",
        "http://localhost/x",
        "http://[::1]/x",
        "http://2130706433/x",
        "http://0x7f.1/x",
        "http://169.254.169.254/latest/meta-data/",
    ]
    with cluster.client("alice-token") as http:
        for url in targets:
            answer = http.post("/v1/jobs", json=quick_job(url))
            assert answer.status_code == 422, (url, answer.text)
            assert answer.json()["detail"][0]["field"] == "callback_url"

    with cluster.client("alice-token") as http:
        assert http.delete(f"/v1/jobs/{job['id']}").status_code == 202
    record = stack.wait_record(job["id"], "failed")
    assert record["last_error"].startswith("refused: resolves to a loopback address")
    assert record["attempt"] == "1"
    assert stack.receiver.at("/late") == []
    assert callbacks_counted(cluster, "refused") == 1
