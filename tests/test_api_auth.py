"""Bearer tokens, scopes and tenant isolation, against a real router process (no workers)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, Cluster

pytestmark = pytest.mark.cluster

JOB = {"name": "auth probe", "steps": [{"id": "a", "plugin": "text", "action": "count", "args": {"text": "hi"}}]}


def _anon(cluster: Cluster, **headers: str) -> httpx.Client:
    return httpx.Client(base_url=cluster.url, headers=headers, timeout=30)


def _assert_error(response: httpx.Response, status: int, field: str, reason: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    assert any(d["field"] == field and reason in d["reason"] for d in body["detail"]), body
    return body


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        pytest.param({}, "missing bearer token", id="no-header"),
        pytest.param({"Authorization": ""}, "missing bearer token", id="empty-header"),
        pytest.param({"Authorization": "Basic YWxpY2U6c2VjcmV0"}, "expected 'Authorization: Bearer", id="basic-scheme"),
        pytest.param({"Authorization": "alice-token"}, "expected 'Authorization: Bearer", id="no-scheme"),
        pytest.param({"Authorization": "Bearer"}, "expected 'Authorization: Bearer", id="bearer-without-token"),
        pytest.param({"Authorization": "Bearer nobody-token"}, "unknown token", id="unknown-token"),
        pytest.param({"Authorization": "Bearer alice-token-and-more"}, "unknown token", id="token-with-suffix"),
        pytest.param({"Authorization": "Bearer alice"}, "unknown token", id="token-prefix"),
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/metrics"), ("GET", "/v1/workers")],
)
def test_unauthenticated_requests_are_401_with_bearer_challenge(
    module_router: Cluster, headers: dict[str, str], reason: str, method: str, path: str
) -> None:
    with _anon(module_router, **headers) as http:
        response = http.request(method, path, json=JOB if method == "POST" else None)
    body = _assert_error(response, 401, "Authorization", reason)
    assert body["error"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_bearer_scheme_is_case_insensitive(module_router: Cluster) -> None:
    with _anon(module_router, Authorization="bearer alice-token") as http:
        assert http.get("/v1/jobs").status_code == 200


def test_a_rejected_submission_writes_nothing(module_router: Cluster) -> None:
    before = set(module_router.redis.client().keys("ef:job:*"))
    with _anon(module_router, Authorization="Bearer reader-token") as http:
        assert http.post("/v1/jobs", json=JOB).status_code == 403
    with _anon(module_router) as http:
        assert http.post("/v1/jobs", json=JOB).status_code == 401
    assert set(module_router.redis.client().keys("ef:job:*")) == before


def test_read_scope_cannot_submit_or_cancel_but_can_read(module_router: Cluster) -> None:
    with module_router.client("reader-token") as reader:
        denied = reader.post("/v1/jobs", json=JOB)
        body = _assert_error(denied, 403, "Authorization", "lacks the 'submit' scope")
        assert body["error"] == "forbidden"
        listed = reader.get("/v1/jobs")
        assert listed.status_code == 200, listed.text
        assert set(listed.json()) == {"jobs", "next_cursor"}
        assert reader.get("/metrics").status_code == 200
        assert reader.get("/v1/workers").status_code == 200

    # reader-token belongs to tenant alice: it sees alice's job but may not cancel it.
    job = module_router.submit(JOB, token="alice-token")
    with module_router.client("reader-token") as reader:
        assert reader.get(f"/v1/jobs/{job['id']}").status_code == 200
        cancel = reader.delete(f"/v1/jobs/{job['id']}")
        _assert_error(cancel, 403, "Authorization", "lacks the 'submit' scope")
    assert module_router.job(job["id"])["state"] == "running"
    with module_router.client("alice-token") as alice:
        assert alice.delete(f"/v1/jobs/{job['id']}").status_code == 202


def test_healthz_needs_no_token(module_router: Cluster) -> None:
    with _anon(module_router) as http:
        response = http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "redis": "ok"}


def test_metrics_need_a_token(module_router: Cluster) -> None:
    with _anon(module_router) as http:
        _assert_error(http.get("/metrics"), 401, "Authorization", "missing bearer token")
    with module_router.client("alice-token") as alice:
        response = alice.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE" in response.text


def test_tenants_are_isolated(module_router: Cluster) -> None:
    alice_job = module_router.submit({**JOB, "name": "alice's secret"}, token="alice-token")
    job_id = alice_job["id"]
    assert alice_job["tenant"] == "alice"
    bob_job = module_router.submit({**JOB, "name": "bob's own"}, token="bob-token")

    with module_router.client("bob-token") as bob:
        # Missing, not forbidden: a job id is no oracle for other tenants.
        for method, path in [
            ("GET", f"/v1/jobs/{job_id}"),
            ("GET", f"/v1/jobs/{job_id}/events"),
            ("DELETE", f"/v1/jobs/{job_id}"),
        ]:
            response = bob.request(method, path)
            body = _assert_error(response, 404, "job_id", "no job")
            assert body["error"] == "not_found"
            assert "alice" not in response.text
        listed = [j["id"] for j in bob.get("/v1/jobs", params={"limit": 500}).json()["jobs"]]
        assert job_id not in listed
        assert bob_job["id"] in listed
        running = [j["id"] for j in bob.get("/v1/jobs", params={"state": "running"}).json()["jobs"]]
        assert job_id not in running and bob_job["id"] in running
    # bob's DELETE did nothing
    assert module_router.job(job_id)["state"] == "running"

    with module_router.client("alice-token") as alice:
        assert alice.get(f"/v1/jobs/{job_id}").json()["name"] == "alice's secret"
        alice_listed = [j["id"] for j in alice.get("/v1/jobs", params={"limit": 500}).json()["jobs"]]
        assert job_id in alice_listed and bob_job["id"] not in alice_listed
        assert alice.get(f"/v1/jobs/{bob_job['id']}").status_code == 404

    with module_router.client(ADMIN_TOKEN) as admin:
        seen = admin.get(f"/v1/jobs/{job_id}")
        assert seen.status_code == 200 and seen.json()["tenant"] == "alice"
        everything = {j["id"]: j["tenant"] for j in admin.get("/v1/jobs", params={"limit": 500}).json()["jobs"]}
        assert everything[job_id] == "alice" and everything[bob_job["id"]] == "bob"
        # The admin may cancel any tenant's job.
        for jid in (job_id, bob_job["id"]):
            assert admin.delete(f"/v1/jobs/{jid}").status_code == 202


def test_unknown_job_is_404_for_everyone(module_router: Cluster) -> None:
    with module_router.client(ADMIN_TOKEN) as admin:
        _assert_error(admin.get("/v1/jobs/0123456789abcdef"), 404, "job_id", "no job")
        _assert_error(admin.delete("/v1/jobs/0123456789abcdef"), 404, "job_id", "no job")


def test_api_docs_are_served(module_router: Cluster) -> None:
    # The API description holds no secrets; FastAPI serves it openly, like /healthz.
    with _anon(module_router) as http:
        schema = http.get("/openapi.json")
        docs = http.get("/docs")
    assert schema.status_code == 200
    spec = schema.json()
    assert spec["info"]["title"] == "edgefleet router"
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/healthz", "/metrics"} <= set(spec["paths"])
    assert "requestBody" in spec["paths"]["/v1/jobs"]["post"]
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]
    assert "/openapi.json" in docs.text
