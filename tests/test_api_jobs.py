"""The jobs API on a real cluster (router + one cpu,io worker node): idempotency,
pagination, cancellation and server-sent events."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, Cluster, wait_until

pytestmark = pytest.mark.cluster


def _count(text: str = "a b c") -> dict[str, Any]:
    return {"id": "count", "plugin": "text", "action": "count", "args": {"text": text}}


def _quick_job(name: str | None = None, text: str = "a b c") -> dict[str, Any]:
    body: dict[str, Any] = {"steps": [_count(text)]}
    if name is not None:
        body["name"] = name
    return body


def _subtask(job: dict[str, Any], sid: str) -> dict[str, Any]:
    return next(st for st in job["subtasks"] if st["id"] == sid)


# --- idempotency ------------------------------------------------------------------------


def test_same_idempotency_key_and_body_returns_the_same_job(shared_cluster: Cluster) -> None:
    key = f"idem-{uuid.uuid4().hex}"
    body = _quick_job(name="idempotent", text="one two")
    with shared_cluster.client("alice-token") as alice:
        first = alice.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        assert first.status_code == 201, first.text
        again = alice.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        assert again.status_code == 200, again.text
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["Location"] == first.headers["Location"]

        # The same request written differently (key order, spacing, an explicit default) is the same body.
        raw = json.dumps({"priority": "normal", "name": "idempotent", "steps": body["steps"]}, indent=2)
        respelled = alice.post(
            "/v1/jobs", content=raw, headers={"Idempotency-Key": key, "Content-Type": "application/json"}
        )
        assert respelled.status_code == 200, respelled.text
        assert respelled.json()["id"] == first.json()["id"]

        # Still the same job after it finished.
        done = shared_cluster.wait_job(first.json()["id"])
        assert done["state"] == "succeeded"
        late = alice.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        assert late.status_code == 200 and late.json()["id"] == done["id"]
        assert late.json()["state"] == "succeeded"

    # Only one job was ever made with this name for alice.
    with shared_cluster.client("alice-token") as alice:
        names = [
            j["id"] for j in alice.get("/v1/jobs", params={"limit": 500}).json()["jobs"] if j["name"] == "idempotent"
        ]
    assert names == [done["id"]]


def test_same_idempotency_key_with_another_body_is_a_conflict(shared_cluster: Cluster) -> None:
    key = f"idem-{uuid.uuid4().hex}"
    with shared_cluster.client("alice-token") as alice:
        first = alice.post("/v1/jobs", json=_quick_job(text="first"), headers={"Idempotency-Key": key})
        assert first.status_code == 201, first.text
        before = set(shared_cluster.redis.client().keys("ef:job:*"))
        other = alice.post("/v1/jobs", json=_quick_job(text="second"), headers={"Idempotency-Key": key})
        assert other.status_code == 422, other.text
        body = other.json()
        assert body["error"] == "idempotency_conflict"
        assert body["detail"] == [{"field": "Idempotency-Key", "reason": "already used for a different request body"}]
        assert set(shared_cluster.redis.client().keys("ef:job:*")) == before
    shared_cluster.wait_job(first.json()["id"])


def test_idempotency_keys_are_per_tenant(shared_cluster: Cluster) -> None:
    key = f"idem-{uuid.uuid4().hex}"
    body = _quick_job(name="per-tenant")
    with shared_cluster.client("alice-token") as alice, shared_cluster.client("bob-token") as bob:
        a = alice.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        b = bob.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        assert a.status_code == 201 and b.status_code == 201, (a.text, b.text)
        assert a.json()["id"] != b.json()["id"]
        assert a.json()["tenant"] == "alice" and b.json()["tenant"] == "bob"
        # Each tenant's replay finds its own job.
        assert alice.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}).json()["id"] == a.json()["id"]
        assert bob.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}).json()["id"] == b.json()["id"]
    for job_id in (a.json()["id"], b.json()["id"]):
        assert shared_cluster.wait_job(job_id)["state"] == "succeeded"


# --- listing and pagination -------------------------------------------------------------


def _all_pages(http: httpx.Client, limit: int, **params: Any) -> tuple[list[dict[str, Any]], int]:
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = {"limit": limit, **params, **({"cursor": cursor} if cursor else {})}
        response = http.get("/v1/jobs", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["jobs"]) <= limit
        seen += page["jobs"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            return seen, pages
        assert page["jobs"], "a page with a next cursor must not be empty"
        assert pages < 100


def test_pagination_sees_every_job_once_newest_first(shared_cluster: Cluster) -> None:
    tag = f"page-{uuid.uuid4().hex[:8]}"
    ids = [shared_cluster.submit(_quick_job(name=f"{tag}-{i}"), token="bob-token")["id"] for i in range(7)]
    with shared_cluster.client("bob-token") as bob:
        listed, pages = _all_pages(bob, limit=3)
        all_ids = [j["id"] for j in listed]
        assert len(all_ids) == len(set(all_ids)), "a job was listed twice"
        mine = [j for j in listed if j["name"] and j["name"].startswith(tag)]
        assert [j["id"] for j in mine] == ids[::-1]  # newest first, each exactly once
        assert pages >= 3
        created = [j["created_at"] for j in listed]
        assert created == sorted(created, reverse=True)
        assert {j["tenant"] for j in listed} == {"bob"}

        for job_id in ids:
            assert shared_cluster.wait_job(job_id)["state"] == "succeeded"

        done, _ = _all_pages(bob, limit=3, state="succeeded")
        assert {j["state"] for j in done} == {"succeeded"}
        assert [j["id"] for j in done if j["id"] in ids] == ids[::-1]
        assert all(j["finished_at"] is not None for j in done)
        running, _ = _all_pages(bob, limit=50, state="running")
        assert not {j["id"] for j in running} & set(ids)


def test_jobs_submitted_between_pages_do_not_shift_the_next_page(shared_cluster: Cluster) -> None:
    ids = [shared_cluster.submit(_quick_job(), token="alice-token")["id"] for _ in range(4)]
    with shared_cluster.client("alice-token") as alice:
        first = alice.get("/v1/jobs", params={"limit": 2}).json()
        newer = [shared_cluster.submit(_quick_job(), token="alice-token")["id"] for _ in range(3)]
        second = alice.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [j["id"] for j in first["jobs"]] == ids[:1:-1]
    assert [j["id"] for j in second["jobs"]] == ids[1::-1]  # not a repeat of the first page
    assert not {j["id"] for j in second["jobs"]} & set(newer)
    for job_id in ids + newer:
        shared_cluster.wait_job(job_id)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"state": "nope"}, "state"),
        ({"cursor": "-1"}, "cursor"),
        ({"cursor": "abc"}, "cursor"),
    ],
)
def test_bad_list_parameters_are_422(shared_cluster: Cluster, params: dict[str, Any], field: str) -> None:
    with shared_cluster.client("alice-token") as alice:
        response = alice.get("/v1/jobs", params=params)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_request"
    assert any(d["field"].split(".")[-1] == field and d["reason"] for d in body["detail"]), body


# --- cancellation -----------------------------------------------------------------------


def test_cancel_stops_the_running_subtask_and_its_dependents(shared_cluster: Cluster) -> None:
    body = {
        "name": "to be cancelled",
        "steps": [
            {"id": "nap", "plugin": "sleep", "action": "sleep", "args": {"seconds": 30}},
            {"id": "after", "plugin": "text", "action": "count", "args": {"text": "never"}, "needs": ["nap"]},
        ],
    }
    job_id = shared_cluster.submit(body, token="alice-token")["id"]
    wait_until(lambda: _subtask(shared_cluster.job(job_id), "nap")["state"] == "running", 20, what="nap running")
    with shared_cluster.client("alice-token") as alice:
        response = alice.delete(f"/v1/jobs/{job_id}")
        assert response.status_code == 202, response.text
        assert response.json()["id"] == job_id

    # Waits are generous (a loaded box is slow); what matters is the order and the final states.
    job = wait_until(lambda: (j := shared_cluster.job(job_id))["state"] == "cancelled" and j, 30, what="job cancelled")
    assert job["error"] == "cancelled by request" and job["finished_at"] is not None

    # The running attempt notices on its next lease renewal and stops (cooperatively).
    nap = wait_until(
        lambda: (st := _subtask(shared_cluster.job(job_id), "nap"))["state"] == "cancelled" and st,
        30,
        what="nap cancelled",
    )
    assert nap["started_at"] is not None and nap["finished_at"] is not None
    assert nap["finished_at"] - nap["started_at"] < 15, "the sleep ran on instead of stopping"
    assert nap["output"] is None

    after = _subtask(shared_cluster.job(job_id), "after")
    assert after["state"] == "cancelled"
    assert after["started_at"] is None and after["queued_at"] is None
    assert after["output"] is None

    # Cancelling again changes nothing; the slot the nap held is free for new work.
    with shared_cluster.client("alice-token") as alice:
        again = alice.delete(f"/v1/jobs/{job_id}")
        assert again.status_code == 202 and again.json()["state"] == "cancelled"
    follow = shared_cluster.submit(_quick_job(), token="alice-token")
    assert shared_cluster.wait_job(follow["id"], timeout=20)["state"] == "succeeded"


def test_cancel_of_a_finished_job_leaves_it_finished(shared_cluster: Cluster) -> None:
    job_id = shared_cluster.submit(_quick_job(), token="alice-token")["id"]
    assert shared_cluster.wait_job(job_id)["state"] == "succeeded"
    with shared_cluster.client("alice-token") as alice:
        response = alice.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 409, response.text
    assert shared_cluster.job(job_id)["state"] == "succeeded"
    assert _subtask(shared_cluster.job(job_id), "count")["state"] == "succeeded"


def test_cancel_unknown_job_is_404(shared_cluster: Cluster) -> None:
    with shared_cluster.client(ADMIN_TOKEN) as admin:
        response = admin.delete(f"/v1/jobs/{uuid.uuid4().hex}")
    assert response.status_code == 404, response.text
    assert response.json()["detail"][0]["field"] == "job_id"


# --- server-sent events -----------------------------------------------------------------


@dataclass
class Event:
    id: str
    event: str
    data: dict[str, Any]


def _stream_id(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def _read_events(cluster: Cluster, job_id: str, last_event_id: str | None = None, timeout: float = 30) -> list[Event]:
    """Read the whole stream; fails if it does not end by itself within `timeout`."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    events: list[Event] = []
    fields: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    with (
        cluster.client("alice-token") as http,
        http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as response,
    ):
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            assert time.monotonic() < deadline, f"stream still open after {timeout}s: {events}"
            if line.startswith(":"):
                continue  # a comment (ping)
            if line == "":
                if "data" in fields:
                    events.append(Event(fields["id"], fields["event"], json.loads(fields["data"])))
                fields = {}
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
    return events


def test_events_stream_follows_the_job_and_ends_by_itself(shared_cluster: Cluster) -> None:
    body = {
        "steps": [
            _count("stream me please"),
            {
                "id": "shout",
                "plugin": "text",
                "action": "transform",
                "args": {"text": "hey", "op": "upper"},
                "needs": ["count"],
            },
        ]
    }
    job_id = shared_cluster.submit(body, token="alice-token")["id"]
    events = _read_events(shared_cluster, job_id)

    ids = [_stream_id(e.id) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "event ids must strictly increase"
    for e in events:
        assert e.event == e.data["type"]
        assert isinstance(e.data["ts"], float)

    assert (events[0].event, events[0].data["state"]) == ("job", "running")
    assert events[0].data["subtasks"] == ["count", "shout"]
    assert (events[-1].event, events[-1].data["state"]) == ("job", "succeeded")
    assert [e for e in events if e.event == "job"] == [events[0], events[-1]]

    for sid in ("count", "shout"):
        states = [e.data["state"] for e in events if e.event == "subtask" and e.data["subtask"] == sid]
        assert states == ["ready", "queued", "running", "succeeded"], (sid, states)
    # The DAG order is visible in the stream: shout becomes ready only after count succeeded.
    position = {(e.data.get("subtask"), e.data.get("state")): i for i, e in enumerate(events)}
    assert position[("count", "succeeded")] < position[("shout", "ready")]
    assert shared_cluster.job(job_id)["state"] == "succeeded"

    # Reconnecting with Last-Event-ID replays only what came after that event.
    replay = _read_events(shared_cluster, job_id, last_event_id=events[2].id)
    assert replay == events[3:]
    # A stream read again from the start is the same stream.
    assert _read_events(shared_cluster, job_id) == events


def test_reconnect_after_the_final_event_ends_at_once(shared_cluster: Cluster) -> None:
    """EventSource clients reconnect when a stream closes, sending the last id they saw."""
    job_id = shared_cluster.submit(_quick_job(), token="alice-token")["id"]
    shared_cluster.wait_job(job_id)
    events = _read_events(shared_cluster, job_id)
    assert events[-1].data["state"] == "succeeded"
    # _read_events fails unless the server ends the stream itself: nothing left to send, it closes.
    assert _read_events(shared_cluster, job_id, last_event_id=events[-1].id, timeout=30) == []


def test_events_stream_survives_a_quiet_spell(shared_cluster: Cluster) -> None:
    """No event for longer than the stream's blocking read (5 s): the stream stays open."""
    body = {
        "steps": [
            {"id": "nap", "plugin": "sleep", "action": "sleep", "args": {"seconds": 7}},
            {"id": "count", "plugin": "text", "action": "count", "args": {"text": "awake"}, "needs": ["nap"]},
        ]
    }
    job_id = shared_cluster.submit(body, token="alice-token")["id"]
    events = _read_events(shared_cluster, job_id, timeout=40)
    assert (events[-1].event, events[-1].data["state"]) == ("job", "succeeded")
    states = [e.data["state"] for e in events if e.event == "subtask" and e.data["subtask"] == "count"]
    assert states == ["ready", "queued", "running", "succeeded"]


@pytest.mark.parametrize("bad", ["nope", "1-2-3", "-1", "1.5", "99999999999999999999", "1-"])
def test_malformed_last_event_id_is_422(shared_cluster: Cluster, bad: str) -> None:
    job_id = shared_cluster.submit(_quick_job(), token="alice-token")["id"]
    with shared_cluster.client("alice-token") as alice:
        response = alice.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": bad})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["field"] == "Last-Event-ID"
    shared_cluster.wait_job(job_id)


def test_events_of_unknown_job_are_404(shared_cluster: Cluster) -> None:
    with shared_cluster.client("alice-token") as alice:
        response = alice.get(f"/v1/jobs/{uuid.uuid4().hex}/events")
    assert response.status_code == 404, response.text
