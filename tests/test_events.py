"""A job's events: a small list per job plus one shared, capped doorbell stream (issue 12).

Over HTTP (a router, no worker: jobs wait until cancelled): two jobs followed at once each see
only their own events, all of them; a stream resumed with Last-Event-ID while the job runs
gets exactly the rest. Against the store: a follower whose doorbells were trimmed from the
shared feed, or whose job's list dropped its oldest events, still gets each event once;
events written in the old form (a stream per job) are read with the new ones and deleted by
retention.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from edgefleet.schemas import Plan, PlannedSubtask, PriorityClass, ResourceClass
from edgefleet.store import JobStore
from edgefleet.store.events import JobEventReader, event_id, unpack_event
from tests.conftest import Cluster, RedisServer, wait_until

TOKEN = "alice-token"
Event = tuple[str, dict[str, Any]]  # (SSE id, decoded data)


def _napping_job(step_id: str) -> dict[str, Any]:
    return {"steps": [{"id": step_id, "plugin": "sleep", "action": "sleep", "args": {"seconds": 30}}]}


def _follow(
    cluster: Cluster, job_id: str, out: list[Event], last_event_id: str | None = None, stop_after: int = 0
) -> None:
    """Append the job's server-sent events to `out` until the server ends the stream (or after
    `stop_after` events, when given)."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    fields: dict[str, str] = {}
    with (
        cluster.client(TOKEN) as http,
        http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=60) as r,
    ):
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith(":"):
                continue
            if line == "":
                if "data" in fields:
                    data = json.loads(fields["data"])
                    assert fields["event"] == data["type"]
                    out.append((fields["id"], data))
                    if stop_after and len(out) >= stop_after:
                        return
                fields = {}
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value


def _stored(cluster: Cluster, job_id: str) -> list[tuple[str, dict[str, str]]]:
    """The job's events as Redis holds them (the witness, read behind the store's back)."""
    return [unpack_event(raw) for raw in cluster.redis.client().lrange(f"ef:ev:{job_id}", 0, -1)]


def _cancel(cluster: Cluster, job_id: str) -> None:
    with cluster.client(TOKEN) as http:
        assert http.delete(f"/v1/jobs/{job_id}").status_code == 202


def _in_thread(target: Any, *args: Any, **kwargs: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, kwargs=kwargs, daemon=True)
    thread.start()
    return thread


def test_two_jobs_followed_at_once_each_see_only_their_own_events(module_router: Cluster) -> None:
    jobs = {step: module_router.submit(_napping_job(step), token=TOKEN)["id"] for step in ("alpha", "beta")}
    seen: dict[str, list[Event]] = {step: [] for step in jobs}
    threads = [_in_thread(_follow, module_router, job_id, seen[step]) for step, job_id in jobs.items()]
    # Both streams are open and have the job's first events before anything else happens to either.
    wait_until(lambda: all(len(events) >= 2 for events in seen.values()), 60, what="both streams started")
    for job_id in jobs.values():
        _cancel(module_router, job_id)
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a stream did not end after its job was cancelled"

    for step, job_id in jobs.items():
        events = seen[step]
        assert events[0][1]["type"] == "job" and events[0][1]["state"] == "running"
        assert events[0][1]["subtasks"] == [step]
        assert events[-1][1]["type"] == "job" and events[-1][1]["state"] == "cancelled"
        assert {e["subtask"] for _, e in events if e["type"] == "subtask"} == {step}
        ids = [event_id(i) for i, _ in events]
        assert ids == sorted(set(ids)), "ids strictly increase"
        # Every event the job has, and nothing else.
        assert [i for i, _ in events] == [i for i, _ in _stored(module_router, job_id)]
    assert not {i for i, _ in seen["alpha"]} & {i for i, _ in seen["beta"]}


def test_a_stream_resumed_while_the_job_runs_gets_exactly_the_rest(module_router: Cluster) -> None:
    job_id = module_router.submit(_napping_job("nap"), token=TOKEN)["id"]
    first: list[Event] = []
    _follow(module_router, job_id, first, stop_after=2)  # then the client goes away
    assert [e["state"] for _, e in first] == ["running", "ready"]

    resumed: list[Event] = []
    thread = _in_thread(_follow, module_router, job_id, resumed, last_event_id=first[1][0])
    # The resumed stream is open on a live job (it has the step's release) before the job ends.
    wait_until(lambda: resumed, 30, what="the resumed stream's first event")
    assert resumed[0][1]["state"] == "queued"
    _cancel(module_router, job_id)
    thread.join(60)
    assert not thread.is_alive(), "the resumed stream did not end with its job"

    stored = _stored(module_router, job_id)
    assert [i for i, _ in stored[:2]] == [i for i, _ in first]
    assert [i for i, _ in resumed] == [i for i, _ in stored[2:]]
    assert resumed[-1][1]["state"] == "cancelled"
    assert ("nap", "cancelled") in [(e.get("subtask"), e["state"]) for _, e in resumed]


# --- against the store ------------------------------------------------------------------


def _create(store: JobStore, step: str = "s") -> str:
    job_id = uuid.uuid4().hex
    subtask = PlannedSubtask(
        id=step,
        plugin="sleep",
        action="sleep",
        args={"seconds": 0},
        needs=[],
        dependents=[],
        resource_class=ResourceClass.cpu,
        timeout=60,
        retries=0,
        retry_backoff=1.0,
    )
    result = store.create_job(
        job_id=job_id,
        tenant="t",
        priority=PriorityClass.normal,
        name=None,
        callback_url=None,
        plan=Plan(subtasks=[subtask]),
        request_json="{}",
        request_hash="h",
        idempotency_key=None,
    )
    assert result.created
    return job_id


def _reader(server: RedisServer, block_ms: int) -> JobEventReader:
    # No socket timeout: the reader may block on the feed for all of `block_ms`.
    return JobEventReader(
        aioredis.Redis.from_url(server.url, decode_responses=True, socket_timeout=None), block_ms=block_ms
    )


def test_a_follower_whose_doorbells_were_trimmed_still_gets_its_events(redis_server: RedisServer) -> None:
    """The feed is capped: a follower that was busy while thousands of other events came by
    finds its job's doorbell trimmed away, and must still see the job end."""
    store = JobStore.from_url(redis_server.url)
    client = redis_server.client()
    job_id = _create(store)

    async def follow() -> list[str]:
        # A wait on the feed that does not end by itself within the test: only a doorbell, or
        # a batch full enough to have lost some, brings the reader back to the job's events.
        reader = _reader(redis_server, block_ms=600_000)
        states: list[str] = []
        entries = reader.entries(job_id, "0")
        try:
            async for _, fields in entries:
                states.append(fields["state"])
                if len(states) == 2:
                    # The reader is paused here (a slow client) while the rest happens.
                    for _ in range(1200):
                        _create(store)
                    store.cancel_job(job_id)
                    for _ in range(1200):
                        _create(store)
                    feed = client.xrange("ef:evfeed")
                    assert len(feed) < 2400, "the feed is capped"
                    assert not [f for _, f in feed if f["j"] == job_id], "the job's doorbells are trimmed"
        finally:
            await entries.aclose()
            await reader.aclose()
        return states

    states = asyncio.run(asyncio.wait_for(follow(), 90))
    assert states == ["running", "ready", "cancelled", "cancelled"]
    # The job's own list kept everything, whatever the feed dropped.
    assert [f["state"] for _, f in map(unpack_event, client.lrange(f"ef:ev:{job_id}", 0, -1))] == states
    store.close()


def test_a_follower_reads_on_after_its_jobs_list_dropped_the_oldest(redis_server: RedisServer) -> None:
    """A job's list keeps its newest events (prelude.lua EVENTS_PER_JOB): when it drops the
    oldest while a follower is paused, the follower's place in the list moves, and it must
    neither skip nor repeat an event."""
    store = JobStore.from_url(redis_server.url)
    client = redis_server.client()
    job_id = _create(store)

    async def follow() -> list[str]:
        reader = _reader(redis_server, block_ms=600_000)
        states: list[str] = []
        entries = reader.entries(job_id, "0")
        try:
            async for _, fields in entries:
                states.append(fields["state"])
                if len(states) == 2:
                    client.ltrim(f"ef:ev:{job_id}", 2, -1)  # what the store's trim does past the cap
                    store.cancel_job(job_id)
        finally:
            await entries.aclose()
            await reader.aclose()
        return states

    assert asyncio.run(asyncio.wait_for(follow(), 90)) == ["running", "ready", "cancelled", "cancelled"]
    store.close()


def test_events_of_the_old_form_are_read_with_the_new_and_deleted_by_retention(redis_server: RedisServer) -> None:
    """A job that was running when the store switched forms: its first events in a stream of
    its own (as the old `event` wrote them), its later ones in the new list."""
    store = JobStore.from_url(redis_server.url)
    client = redis_server.client()
    job_id = _create(store, "old")
    client.delete(f"ef:ev:{job_id}")
    legacy = f"ef:events:{job_id}"
    client.xadd(legacy, {"type": "job", "ts": "1.5", "state": "running", "data": json.dumps({"subtasks": ["old"]})})
    client.xadd(legacy, {"type": "subtask", "ts": "1.6", "subtask": "old", "state": "ready", "data": '{"attempt": 1}'})
    store.cancel_job(job_id)

    async def read(last_id: str) -> list[tuple[str, dict[str, str]]]:
        reader = _reader(redis_server, block_ms=1000)
        try:
            return [event async for event in reader.entries(job_id, last_id)]
        finally:
            await reader.aclose()

    events = asyncio.run(asyncio.wait_for(read("0"), 60))
    assert [(f["type"], f.get("subtask"), f["state"]) for _, f in events] == [
        ("job", None, "running"),
        ("subtask", "old", "ready"),
        ("subtask", "old", "cancelled"),
        ("job", None, "cancelled"),
    ]
    assert json.loads(events[0][1]["data"]) == {"subtasks": ["old"]}
    ids = [event_id(i) for i, _ in events]
    assert ids == sorted(set(ids))
    # Resuming inside the old stream goes on into the new list.
    assert asyncio.run(asyncio.wait_for(read(events[0][0]), 60)) == events[1:]
    # A job the store does not have ends at once (deleted by retention while a client reconnects).
    gone = store.gc(older_than=0)
    assert gone.removed == [job_id]
    assert client.exists(legacy, f"ef:ev:{job_id}", f"ef:job:{job_id}") == 0
    assert asyncio.run(asyncio.wait_for(read("0"), 60)) == []
    store.close()


@pytest.mark.parametrize(
    ("packed", "expected"),
    [
        ("5-0\tjob\t1.25\t\trunning\t", ("5-0", {"type": "job", "ts": "1.25", "state": "running"})),
        (
            '7-1\tsubtask\t2.5\ts1\tfailed\t{"error": "a\\tb"}',
            ("7-1", {"type": "subtask", "ts": "2.5", "subtask": "s1", "state": "failed", "data": '{"error": "a\\tb"}'}),
        ),
        ("9-0\tprogress\t3.0\ts1\t\t", ("9-0", {"type": "progress", "ts": "3.0", "subtask": "s1"})),
    ],
)
def test_unpack_event(packed: str, expected: tuple[str, dict[str, str]]) -> None:
    assert unpack_event(packed) == expected
