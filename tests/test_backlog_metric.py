"""`edgefleet_backlog_depth{resource_class, priority_class}`: the backlog per class and priority.

The per-priority counts live beside each class backlog in Redis and move in the same Lua
scripts. The store test walks every path that adds to or takes from a backlog (create,
dependency ready, release, cancel, lease reap, stuck dispatch, stranded message, retry,
rescore) and after each step compares the stored counts with a count of the backlog's
members by their job's priority; the router test reads the gauge from /metrics after
submits and cancels.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.keys import Keys
from edgefleet.scheduling.state import Released, SchedulerState
from edgefleet.schemas import Plan, PlannedSubtask, PriorityClass, ResourceClass
from edgefleet.store import JobStore
from tests.conftest import Cluster, RedisServer, wait_until

pytestmark = pytest.mark.cluster

CPU, IO = ResourceClass.cpu, ResourceClass.io
PRIORITIES = [p.value for p in PriorityClass]


# --- helpers ----------------------------------------------------------------------------


def step(
    sid: str, rc: ResourceClass = CPU, needs: tuple[str, ...] = (), dependents: tuple[str, ...] = (), retries: int = 0
) -> PlannedSubtask:
    return PlannedSubtask(
        id=sid,
        plugin="sleep",
        action="sleep",
        args={"seconds": 0},
        needs=list(needs),
        dependents=list(dependents),
        resource_class=rc,
        timeout=60,
        retries=retries,
        retry_backoff=0.01,
    )


def create(store: JobStore, priority: str, *steps: PlannedSubtask) -> str:
    job_id = uuid.uuid4().hex
    result = store.create_job(
        job_id=job_id,
        tenant="t",
        priority=PriorityClass(priority),
        name=None,
        callback_url=None,
        plan=Plan(subtasks=list(steps)),
        request_json="{}",
        request_hash="h",
        idempotency_key=None,
    )
    assert result.created
    return job_id


def behind(store: JobStore) -> tuple[redis.Redis, Keys]:
    """The store's Redis and key names, to check what its scripts wrote without its read methods."""
    return store.connection.client, store.connection.keys


def counted_by_hand(store: JobStore) -> dict[str, dict[str, int]]:
    """The backlogs' members counted by their job's priority class, straight from Redis."""
    client, keys = behind(store)
    out: dict[str, dict[str, int]] = {}
    for rc in ResourceClass:
        row = dict.fromkeys(PRIORITIES, 0)
        for m in client.zrange(keys.backlog(rc), 0, -1):
            row[client.hget(keys.job(m.split("|")[0]), "priority")] += 1
        out[rc.value] = row
    return out


def stored(store: JobStore) -> dict[str, dict[str, int]]:
    """The counts as the scripts keep them (no recount)."""
    client, keys = behind(store)
    out = {}
    for rc in ResourceClass:
        row = dict.fromkeys(PRIORITIES, 0)
        row.update({k: int(v) for k, v in client.hgetall(keys.backlog_count(rc)).items()})
        out[rc.value] = row
    return out


def assert_mirrors(store: JobStore) -> None:
    """Each per-priority mirror holds exactly its priority's backlog members, with their scores."""
    client, keys = behind(store)
    for rc in ResourceClass:
        members = client.zrange(keys.backlog(rc), 0, -1, withscores=True)
        for prio in PRIORITIES:
            want = [(m, s) for m, s in members if client.hget(keys.job(m.split("|")[0]), "priority") == prio]
            assert client.zrange(keys.backlog_of_priority(rc, prio), 0, -1, withscores=True) == want


def assert_counts(store: JobStore, **expected: dict[str, int]) -> None:
    scheduler = SchedulerState.of(store)
    by_hand = counted_by_hand(store)
    assert_mirrors(store)
    assert stored(store) == by_hand  # kept exact by the scripts themselves
    assert {rc.value: row for rc, row in scheduler.backlog_counts().items()} == by_hand
    for rc in ResourceClass:
        want = {**dict.fromkeys(PRIORITIES, 0), **expected.get(rc.value, {})}
        assert by_hand[rc.value] == want, (rc.value, by_hand[rc.value], want)
        assert sum(want.values()) == scheduler.backlog_size(rc)


def claim(store: JobStore, item: Released, lease_ttl: float = 60.0) -> None:
    assert store.attempts.claim(item.envelope, node="n1", pid=1, lease_ttl=lease_ttl).verdict == "run"


# --- every path of the job store ----------------------------------------------------------


def test_counts_follow_every_backlog_transition(redis_server: RedisServer) -> None:
    store = JobStore.from_url(redis_server.url)
    scheduler = SchedulerState.of(store)
    inter = create(store, "interactive", step("a"), step("b"), step("f", IO))
    chain = create(store, "batch", step("a", dependents=("b",)), step("b", needs=("a",)))
    normal = create(store, "normal", step("s"))
    retry = create(store, "batch", step("s", retries=1))
    assert_counts(store, cpu={"interactive": 2, "batch": 2, "normal": 1}, io={"interactive": 1})

    # A rescore moves scores, not members.
    assert scheduler.set_weights({"batch": 1000}, "test") == 6
    assert_counts(store, cpu={"interactive": 2, "batch": 2, "normal": 1}, io={"interactive": 1})
    scheduler.set_weights({"batch": 0}, "test")

    # Release takes the two interactive items first; cancelling takes the rest out of the backlog.
    released = scheduler.release(CPU, 2, 100)
    assert {(r.envelope.job_id, r.envelope.priority.value) for r in released} == {(inter, "interactive")}
    scheduler.mark_dispatched(released)
    assert_counts(store, cpu={"batch": 2, "normal": 1}, io={"interactive": 1})
    assert store.cancel_job(normal) == "cancelled"
    assert store.cancel_job(inter) == "cancelled"
    assert_counts(store, cpu={"batch": 2})
    assert store.cancel_job(inter) == "cancelled"  # a second cancel changes nothing
    assert_counts(store, cpu={"batch": 2})

    # A lease that expires puts its subtask back (REAP's lost-lease path).
    first = {r.envelope.job_id: r for r in scheduler.release(CPU, 10, 100)}
    assert set(first) == {chain, retry}
    scheduler.mark_dispatched(list(first.values()))
    assert_counts(store)
    claim(store, first[chain], lease_ttl=0.05)
    wait_until(lambda: store.attempts.reap(max_lost=5, dispatch_grace=3600, stranded_after=3600) == 1, 10, what="reap")
    assert_counts(store, cpu={"batch": 1})

    # A released subtask whose broker send was never confirmed (REAP's dispatching path).
    again = scheduler.release(CPU, 10, 100)
    assert [r.envelope.job_id for r in again] == [chain]
    assert store.attempts.reap(max_lost=5, dispatch_grace=0, stranded_after=3600) == 1
    assert_counts(store, cpu={"batch": 1})
    # A queued subtask whose broker queue is empty (REAP's stranded path): `retry`'s.
    again = scheduler.release(CPU, 10, 100)
    scheduler.mark_dispatched(again)
    assert_counts(store)
    assert store.attempts.reap(max_lost=5, dispatch_grace=3600, stranded_after=0) == 2
    assert_counts(store, cpu={"batch": 2})

    # A failed attempt waits in the delayed set, then comes back (PROMOTE_DELAYED).
    items = {r.envelope.job_id: r for r in scheduler.release(CPU, 10, 100)}
    scheduler.mark_dispatched(list(items.values()))
    claim(store, items[retry])
    done = store.attempts.complete(items[retry].envelope, node="n1", pid=1, outcome="failed", error="boom")
    assert done.accepted and done.job_state == "running"
    assert_counts(store)
    wait_until(lambda: store.attempts.promote_delayed() == 1, 10, what="the retry to be due")
    assert_counts(store, cpu={"batch": 1})

    # A finished step readies its dependent (COMPLETE's make_ready).
    claim(store, items[chain])
    done = store.attempts.complete(items[chain].envelope, node="n1", pid=1, outcome="succeeded", output={"ok": 1})
    assert done.accepted and done.ready_classes == [CPU]
    assert_counts(store, cpu={"batch": 2})

    # Drained: the count hashes are gone with the last member.
    scheduler.mark_dispatched(scheduler.release(CPU, 10, 100))
    assert_counts(store)
    client, keys = behind(store)
    assert all(not client.exists(keys.backlog_count(rc)) for rc in ResourceClass)


def test_counts_are_rebuilt_when_they_do_not_add_up(redis_server: RedisServer) -> None:
    """Backlogs written before the counts existed, or counts changed by hand, are recounted on read."""
    store = JobStore.from_url(redis_server.url)
    scheduler = SchedulerState.of(store)
    client, keys = behind(store)
    create(store, "interactive", step("a"), step("b"))
    create(store, "batch", step("a"), step("b", IO))
    expected = {"cpu": {"interactive": 2, "batch": 1}, "io": {"batch": 1}}
    client.delete(keys.backlog_count(CPU), keys.backlog_count(IO))  # as before an upgrade
    read = {rc.value: row for rc, row in scheduler.backlog_counts().items()}
    assert read == counted_by_hand(store) and stored(store) == read  # recounted and written back
    assert_counts(store, **expected)
    client.hset(keys.backlog_count(CPU), mapping={"interactive": 4, "batch": -1})  # sums right, still wrong
    read = {rc.value: row for rc, row in scheduler.backlog_counts().items()}
    assert read == counted_by_hand(store) and stored(store) == read
    assert_counts(store, **expected)


# --- the gauge on a real router ------------------------------------------------------------


def backlog_gauge(cluster: Cluster) -> dict[tuple[str, str], float]:
    with cluster.client("reader-token") as http:
        text = http.get("/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        if family.name == "edgefleet_backlog_depth":
            for sample in family.samples:
                values[(sample.labels["resource_class"], sample.labels["priority_class"])] = sample.value
    return values


def expect(**by_class: dict[str, int]) -> dict[tuple[str, str], float]:
    return {(rc.value, p): float(by_class.get(rc.value, {}).get(p, 0)) for rc in ResourceClass for p in PRIORITIES}


def test_router_exports_backlog_by_class_and_priority(cluster_factory: Callable[..., Cluster]) -> None:
    # No workers and one released slot per class: everything after the first item of a class waits.
    cluster = cluster_factory(
        EDGEFLEET_TARGET_DEPTH=json.dumps({"cpu": 1, "gpu": 1, "io": 1}), EDGEFLEET_FEEDBACK_INTERVAL="3600"
    )
    cluster.start_router()
    scheduler = SchedulerState.of(JobStore.from_url(cluster.redis.url))
    assert backlog_gauge(cluster) == expect()

    def submit(priority: str, rc: str = "cpu") -> str:
        body = {
            "priority": priority,
            "steps": [{"id": "s", "plugin": "sleep", "action": "sleep", "args": {"seconds": 1}, "resource_class": rc}],
        }
        return cluster.submit(body)["id"]

    submit("batch")
    submit("batch", "io")
    wait_until(
        lambda: scheduler.queued_size(CPU) == 1 and scheduler.queued_size(IO) == 1, 10, what="the released slots"
    )
    batch = [submit("batch") for _ in range(3)]
    interactive = [submit("interactive") for _ in range(2)]
    normal = submit("normal")
    io_interactive = submit("interactive", "io")
    assert backlog_gauge(cluster) == expect(cpu={"batch": 3, "interactive": 2, "normal": 1}, io={"interactive": 1})

    with cluster.client() as http:
        for job_id in (interactive[0], batch[1], normal, io_interactive):
            assert http.delete(f"/v1/jobs/{job_id}").status_code == 202
    assert backlog_gauge(cluster) == expect(cpu={"batch": 2, "interactive": 1})
    # The old single-label view is the sum over priority classes.
    assert sum(v for (rc, _), v in backlog_gauge(cluster).items() if rc == "cpu") == scheduler.backlog_size(CPU) == 3
    with cluster.client("reader-token") as http:
        assert http.get("/v1/scheduler").json()["backlog"]["cpu"] == 3
    assert httpx.get(f"{cluster.url}/metrics", timeout=5).status_code == 401


def test_finished_jobs_reads_many_jobs_and_their_subtasks_at_once(redis_server: RedisServer) -> None:
    """The router's finish watcher reads every job that finished since its last pass in one go."""
    store = JobStore.from_url(redis_server.url)
    one = create(store, "normal", step("s"))
    two = create(store, "batch", step("a", dependents=("b",)), step("b", needs=("a",)))
    jobs = store.finished_jobs([one, "0" * 32, two])
    assert [job.priority if job else None for job in jobs] == ["normal", None, "batch"]
    assert jobs[0] is not None and [st.state for st in jobs[0].subtasks] == ["ready"]
    assert jobs[2] is not None and [st.state for st in jobs[2].subtasks] == ["ready", "waiting"]
    assert store.finished_job(two) == jobs[2]
    assert store.finished_jobs([]) == []
