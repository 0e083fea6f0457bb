"""Bad input to POST /v1/jobs: a 4xx naming the field and the reason, and nothing written to Redis.

Runs against a real router process on a real redis-server, without workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, Cluster

pytestmark = pytest.mark.cluster

# Keys that exist whatever the API does: node heartbeats.
BACKGROUND_PREFIXES = ("ef:node", "ef:nodes")
# Keys that only a submitted job creates.
JOB_PREFIXES = ("ef:job:", "ef:st:", "ef:ev:", "ef:events:", "ef:jobs", "ef:idem:", "ef:backlog:")


def _step(step_id: str = "a", plugin: str = "text", action: str = "count", **extra: Any) -> dict[str, Any]:
    step: dict[str, Any] = {"id": step_id, "plugin": plugin, "action": action}
    step.setdefault("args", {"text": "hello"} if (plugin, action) == ("text", "count") else {})
    step.update(extra)
    return step


def _sleep(step_id: str, seconds: Any = 0, **extra: Any) -> dict[str, Any]:
    return _step(step_id, "sleep", "sleep", args={"seconds": seconds}, **extra)


GOOD_STEPS = [_step("a")]

# (case id, request kwargs for httpx, expected status, expected field, reason substring)
BAD_INPUTS: list[tuple[str, dict[str, Any], int, str, str]] = [
    (
        "unknown-plugin",
        {"json": {"steps": [_step("a", "nope", "run")]}},
        422,
        "steps.0.plugin",
        "unknown plugin 'nope'",
    ),
    ("unknown-action", {"json": {"steps": [_step("a", "text", "shred")]}}, 422, "steps.0.action", "no action 'shred'"),
    (
        "two-cycle",
        {"json": {"steps": [_sleep("a", needs=["b"]), _sleep("b", needs=["a"])]}},
        422,
        "steps.0.needs",
        "cycle in needs",
    ),
    (
        "three-cycle",
        {"json": {"steps": [_sleep("a", needs=["c"]), _sleep("b", needs=["a"]), _sleep("c", needs=["b"])]}},
        422,
        "steps.0.needs",
        "cycle in needs: a -> c -> b -> a",
    ),
    (
        "dangling-needs",
        {"json": {"steps": [_sleep("a"), _sleep("b", needs=["ghost"])]}},
        422,
        "steps.1.needs",
        "unknown step 'ghost'",
    ),
    ("self-need", {"json": {"steps": [_sleep("a", needs=["a"])]}}, 422, "steps.0.needs", "cannot need itself"),
    (
        "duplicate-step-id",
        {"json": {"steps": [_sleep("a"), _sleep("a")]}},
        422,
        "steps.1.id",
        "duplicate step id 'a'",
    ),
    ("bad-step-id", {"json": {"steps": [_sleep("1st")]}}, 422, "steps.0.id", "should match pattern"),
    (
        "ref-to-missing-step",
        {"json": {"steps": [_step("a", args={"path": {"$ref": "steps.ghost.output.path"}})]}},
        422,
        "steps.0.args.path",
        "unknown step 'ghost'",
    ),
    (
        "malformed-ref",
        {"json": {"steps": [_sleep("a"), _step("b", args={"path": {"$ref": "a.output"}})]}},
        422,
        "steps.1.args.path",
        "must look like 'steps.<id>.output",
    ),
    (
        "body-too-large",
        {"json": {"steps": [_step("a", args={"text": "x" * 1_200_000})]}},
        413,
        "body",
        "larger than 1000000 bytes",
    ),
    (
        "arg-wrong-type",
        {"json": {"steps": [_sleep("a", seconds="5")]}},
        422,
        "steps.0.args.seconds",
        "not of type 'number'",
    ),
    (
        "arg-out-of-range",
        {"json": {"steps": [_sleep("a", seconds=-1)]}},
        422,
        "steps.0.args.seconds",
        "less than the minimum",
    ),
    (
        "missing-required-arg",
        {"json": {"steps": [_step("a", "sleep", "sleep", args={"fail": True})]}},
        422,
        "steps.0.args.seconds",
        "is required",
    ),
    (
        "unknown-arg",
        {"json": {"steps": [_step("a", args={"text": "x", "colour": "red"})]}},
        422,
        "steps.0.args.colour",
        "unknown argument",
    ),
    ("empty-steps", {"json": {"steps": []}}, 422, "steps", "at least one step"),
    (
        "neither-steps-nor-template",
        {"json": {"name": "nothing"}},
        422,
        "steps",
        "exactly one of 'steps', 'template' or 'goal'",
    ),
    (
        "steps-and-template",
        {"json": {"steps": GOOD_STEPS, "template": "text-report", "inputs": {"text": "x"}}},
        422,
        "steps",
        "exactly one of 'steps', 'template' or 'goal'",
    ),
    ("unknown-template", {"json": {"template": "no-such-flow"}}, 422, "template", "unknown template 'no-such-flow'"),
    ("template-input-missing", {"json": {"template": "text-report"}}, 422, "inputs.text", "is required"),
    (
        "template-input-wrong-type",
        {"json": {"template": "text-report", "inputs": {"text": 42}}},
        422,
        "inputs.text",
        "must be of type string",
    ),
    (
        "bad-priority",
        {"json": {"steps": GOOD_STEPS, "priority": "urgent"}},
        422,
        "priority",
        "'interactive', 'normal' or 'batch'",
    ),
    (
        "bad-callback-url",
        {"json": {"steps": GOOD_STEPS, "callback_url": "not a url"}},
        422,
        "callback_url",
        "valid URL",
    ),
    (
        "malformed-json",
        {"content": b'{"steps": [', "headers": {"Content-Type": "application/json"}},
        400,
        "body",
        "not valid JSON",
    ),
    (
        "nan-is-not-json",
        {
            "content": b'{"steps": [{"id": "a", "plugin": "sleep", "action": "sleep", "args": {"seconds": NaN}}]}',
            "headers": {"Content-Type": "application/json"},
        },
        400,
        "body",
        "NaN is not allowed",
    ),
    (
        "deeply-nested-json",
        {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"Content-Type": "application/json"}},
        422,
        "body",
        "nested deeper than",
    ),
    ("json-array-body", {"json": [{"steps": GOOD_STEPS}]}, 422, "body", "must be a JSON object"),
    (
        "unknown-top-level-field",
        {"json": {"steps": GOOD_STEPS, "colour": "red"}},
        422,
        "colour",
        "Extra inputs are not permitted",
    ),
    (
        "unknown-step-field",
        {"json": {"steps": [_step("a", colour="red")]}},
        422,
        "steps.0.colour",
        "Extra inputs are not permitted",
    ),
    (
        "timeout-above-max",
        {"json": {"steps": [_sleep("a", timeout=4000)]}},
        422,
        "steps.0.timeout",
        "at most 3600 seconds",
    ),
    (
        "inputs-with-steps",
        {"json": {"steps": GOOD_STEPS, "inputs": {"text": "x"}}},
        422,
        "inputs",
        "belong to a template",
    ),
    # The body's type: JSON only, said so by its Content-Type (item 12 of issue 9).
    (
        "text-plain-body",
        {
            "content": b'{"steps": [{"id": "a", "plugin": "text", "action": "count", "args": {"text": "x"}}]}',
            "headers": {"Content-Type": "text/plain"},
        },
        415,
        "Content-Type",
        "'text/plain' is not accepted",
    ),
    ("form-body", {"data": {"steps": "x"}}, 415, "Content-Type", "'application/x-www-form-urlencoded' is not accepted"),
    ("no-content-type", {"content": b'{"steps": []}'}, 415, "Content-Type", "missing"),
    (
        "latin1-charset",
        {"content": b'{"steps": []}', "headers": {"Content-Type": "application/json; charset=latin-1"}},
        415,
        "Content-Type",
        "JSON is UTF-8",
    ),
    # Strict types: a boolean or a string is not a number, a number is not a boolean.
    ("timeout-true", {"json": {"steps": [_sleep("a", timeout=True)]}}, 422, "steps.0.timeout", "valid number"),
    ("timeout-string", {"json": {"steps": [_sleep("a", timeout="5")]}}, 422, "steps.0.timeout", "valid number"),
    ("retries-true", {"json": {"steps": [_sleep("a", retries=True)]}}, 422, "steps.0.retries", "valid integer"),
    ("retries-fraction", {"json": {"steps": [_sleep("a", retries=1.5)]}}, 422, "steps.0.retries", "valid integer"),
    ("retries-string", {"json": {"steps": [_sleep("a", retries="2")]}}, 422, "steps.0.retries", "valid integer"),
    (
        "backoff-string",
        {"json": {"steps": [_sleep("a", retry_backoff="1")]}},
        422,
        "steps.0.retry_backoff",
        "valid number",
    ),
    ("deadline-true", {"json": {"steps": GOOD_STEPS, "deadline_s": True}}, 422, "deadline_s", "valid number"),
    ("dry-run-string", {"json": {"steps": GOOD_STEPS, "dry_run": "true"}}, 422, "dry_run", "valid boolean"),
    ("dry-run-number", {"json": {"steps": GOOD_STEPS, "dry_run": 1}}, 422, "dry_run", "valid boolean"),
    (
        "priority-number",
        {"json": {"steps": GOOD_STEPS, "priority": 1}},
        422,
        "priority",
        "'interactive', 'normal' or 'batch'",
    ),
    # Two ways to say what to run: a 422 naming both, before any model is asked to plan the goal.
    (
        "goal-and-steps",
        {"json": {"goal": "count the words in 'a b'", "steps": GOOD_STEPS}},
        422,
        "goal",
        "this body has 'steps' and 'goal'",
    ),
    (
        "goal-and-steps-names-steps",
        {"json": {"goal": "count the words in 'a b'", "steps": GOOD_STEPS}},
        422,
        "steps",
        "this body has 'steps' and 'goal'",
    ),
    (
        "goal-and-template",
        {"json": {"goal": "report", "template": "text-report", "inputs": {"text": "x"}}},
        422,
        "template",
        "this body has 'template' and 'goal'",
    ),
    (
        "idempotency-key-too-long",
        {"json": {"steps": GOOD_STEPS}, "headers": {"Idempotency-Key": "k" * 201}},
        422,
        "Idempotency-Key",
        "1 to 200 characters",
    ),
]


def _job_keys(cluster: Cluster) -> set[str]:
    keys = cluster.redis.client().keys("*")
    return {k for k in keys if not k.startswith(BACKGROUND_PREFIXES)}


@pytest.fixture()
def admin(router_only: Cluster) -> Iterator[httpx.Client]:
    with router_only.client(ADMIN_TOKEN) as http:
        yield http


@pytest.fixture()
def module_admin(module_router: Cluster) -> Iterator[httpx.Client]:
    with module_router.client(ADMIN_TOKEN) as http:
        yield http


@pytest.mark.parametrize(
    ("kwargs", "status", "field", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS],
)
def test_bad_submission_is_rejected_and_writes_nothing(
    module_router: Cluster, module_admin: httpx.Client, kwargs: dict[str, Any], status: int, field: str, reason: str
) -> None:
    before = _job_keys(module_router)
    response = module_admin.post("/v1/jobs", **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("detail"), list) and body["detail"], body
    for item in body["detail"]:
        assert set(item) == {"field", "reason"}, body
    matching = [item for item in body["detail"] if item["field"] == field]
    assert matching, f"no problem reported for {field!r}: {body}"
    assert any(reason in item["reason"] for item in matching), body
    after = _job_keys(module_router)
    assert after == before, f"bad input wrote to redis: {sorted(after - before)}"
    leaked = [k for k in after if k.startswith(JOB_PREFIXES)]
    assert not leaked, leaked


def test_every_bad_input_in_a_row_leaves_no_job_state_then_a_good_one_is_accepted(
    router_only: Cluster, admin: httpx.Client
) -> None:
    for case_id, kwargs, status, _, _ in BAD_INPUTS:
        response = admin.post("/v1/jobs", **kwargs)
        assert response.status_code == status, (case_id, response.text)
    leaked = sorted(k for k in _job_keys(router_only) if k.startswith(JOB_PREFIXES))
    assert leaked == [], leaked
    assert admin.get("/v1/jobs").json() == {"jobs": [], "next_cursor": None}

    # The router is still healthy and accepts a valid job (no workers: it stays running).
    response = admin.post("/v1/jobs", json={"name": "after the storm", "steps": GOOD_STEPS})
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["state"] == "running" and job["name"] == "after the storm"
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert [st["id"] for st in job["subtasks"]] == ["a"]
    assert router_only.redis.client().exists(f"ef:job:{job['id']}")

    cancelled = admin.delete(f"/v1/jobs/{job['id']}")
    assert cancelled.status_code == 202, cancelled.text
    assert cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["subtasks"][0]["state"] == "cancelled"


def test_nesting_within_the_limit_is_fine(module_admin: httpx.Client) -> None:
    """The depth limit rejects abuse, not ordinary structured args: 40 levels still plan."""
    nested: Any = "leaf"
    for _ in range(40):
        nested = {"k": nested}
    step = _sleep("a")
    step["args"]["x"] = nested
    # sleep forbids unknown args: the nesting is reported as an unknown argument, not a 500.
    response = module_admin.post("/v1/jobs", json={"steps": [step]})
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["field"] == "steps.0.args.x" and "unknown argument" in problem["reason"]


def test_structured_json_media_types_are_json(module_admin: httpx.Client) -> None:
    """application/*+json with a UTF-8 charset is JSON too (a dry run: nothing is written)."""
    body = b'{"steps": [{"id": "a", "plugin": "text", "action": "count", "args": {"text": "x"}}], "dry_run": true}'
    for content_type in ("application/json; charset=UTF-8", "application/vnd.edgefleet+json"):
        response = module_admin.post("/v1/jobs", content=body, headers={"Content-Type": content_type})
        assert response.status_code == 200, (content_type, response.text)
        assert response.json()["dry_run"] is True


def test_missing_token_is_401_before_the_media_type_is_looked_at(module_router: Cluster) -> None:
    response = httpx.post(f"{module_router.url}/v1/jobs", content=b"hi", headers={"Content-Type": "text/plain"})
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "unauthorized"


@pytest.mark.parametrize(
    ("kwargs", "status", "field", "reason"),
    [
        pytest.param(
            {"content": b'{"weights": {"aging": 1}, "reason": "x"}', "headers": {"Content-Type": "text/plain"}},
            415,
            "Content-Type",
            "'text/plain' is not accepted",
            id="text-plain",
        ),
        pytest.param(
            {"json": {"weights": {"aging": True}, "reason": "x"}},
            422,
            "weights.aging",
            "valid number",
            id="weight-true",
        ),
        pytest.param(
            {"json": {"weights": {"aging": "1"}, "reason": "x"}},
            422,
            "weights.aging",
            "valid number",
            id="weight-string",
        ),
        pytest.param(
            {"content": b'{"weights": ', "headers": {"Content-Type": "application/json"}},
            400,
            "body",
            "not valid JSON",
            id="malformed",
        ),
    ],
)
def test_other_json_endpoints_have_the_same_contract(
    module_admin: httpx.Client, kwargs: dict[str, Any], status: int, field: str, reason: str
) -> None:
    before = module_admin.get("/v1/scheduler").json()["weights"]
    response = module_admin.put("/v1/scheduler/weights", **kwargs)
    assert response.status_code == status, response.text
    problems = response.json()["detail"]
    assert any(p["field"] == field and reason in p["reason"] for p in problems), problems
    assert module_admin.get("/v1/scheduler").json()["weights"] == before


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        ("GET", "/v1/nothing-here", 404, "not_found"),
        ("POST", "/no/such/route", 404, "not_found"),
        ("PATCH", "/v1/jobs", 405, "method_not_allowed"),
        ("PUT", "/v1/jobs/abc", 405, "method_not_allowed"),
        ("DELETE", "/v1/workers", 405, "method_not_allowed"),
    ],
)
def test_unknown_routes_and_methods_use_the_error_shape(
    module_admin: httpx.Client, method: str, path: str, status: int, error: str
) -> None:
    response = module_admin.request(method, path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == error
    assert [set(item) for item in body["detail"]] == [{"field", "reason"}], body
    if status == 405:
        assert response.headers.get("allow"), response.headers  # which methods the route has
