"""Slot chaining (workers/chaining.py): a slot that just ended takes its next subtask itself.

`Dispatcher.take` is tested against a real Redis and kombu publishing to it; the chain itself
in a real cluster (router, node, Celery prefork workers), where what is asserted is which
subtasks ran, in what order and how often, never how long anything took.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgefleet import metric_names
from edgefleet.celery_app import create_celery
from edgefleet.keys import Keys
from edgefleet.scheduling.dispatch import Dispatcher
from edgefleet.scheduling.priority import DEFAULT_WEIGHTS
from edgefleet.scheduling.state import Released, SchedulerState
from edgefleet.schemas import ResourceClass
from edgefleet.settings import Settings
from edgefleet.store import JobStore
from edgefleet.store.attempts import Claimant, completion_argv
from tests.conftest import Cluster, RedisServer, new_marker, wait_until
from tests.test_backlog_metric import create, step
from tests.test_crash import assert_succeeded_exactly_once, marker_lines, pool_process_running, subtask_events
from tests.test_scheduler import (
    cancel,
    one_slot_cluster,
    scheduler_of,
    sleep_body,
    start_blocker,
    wait_queued_full,
)

CPU = ResourceClass.cpu


def dispatcher_on(redis_server: RedisServer) -> tuple[JobStore, Dispatcher]:
    store = JobStore.from_url(redis_server.url)
    scheduler = SchedulerState.of(store)
    scheduler.seed_weights(dict(DEFAULT_WEIGHTS))
    settings = Settings(redis_url=redis_server.url)
    return store, Dispatcher(scheduler, create_celery(settings), settings)


def claimant(token: str = "t") -> Claimant:
    return Claimant(node="here", pid=os.getpid(), lease_ttl=30, max_lost=3, token=token)


def test_take_pops_in_release_order_past_the_target_depth_and_claims(redis_server: RedisServer) -> None:
    store, dispatcher = dispatcher_on(redis_server)
    scheduler = dispatcher.scheduler
    scheduler.set_target_depth(CPU, 0, reason="test: the queue takes nothing")
    batch = create(store, "batch", step("s"))
    normal = create(store, "normal", step("s"))
    interactive = create(store, "interactive", step("s"))
    assert dispatcher.release(CPU) == 0

    client = redis_server.client()
    dispatching = Keys(store.connection.keys.prefix).key("dispatching")
    taken = []
    while (got := dispatcher.take(CPU, claimant())) is not None:
        assert got.claim is not None and got.claim.verdict == "run" and got.claim.args == {"seconds": 0}
        status = store.get_job(got.item.envelope.job_id)
        assert status is not None and status.subtasks[0].state == "running"
        assert client.zcard(dispatching) == 0
        taken.append(got.item.envelope.job_id)
    assert taken == [interactive, normal, batch]
    assert scheduler.backlog_size(CPU) == 0 and scheduler.queued_size(CPU) == 0
    assert store.attempts.running_count() == 3
    assert not [key for key in client.keys("*") if key.startswith(("cpu", "node."))]  # no broker message


def test_take_leaves_what_locality_places_unclaimed(redis_server: RedisServer) -> None:
    """A subtask that reads artifacts, or whose plugin wants a model, is for locality to place:
    popped unclaimed (in the set the reaper puts back after a crash) until the slot claims it."""
    store, dispatcher = dispatcher_on(redis_server)
    client = redis_server.client()
    dispatching = Keys(store.connection.keys.prefix).key("dispatching")
    with_ref = create(store, "normal", step("s").model_copy(update={"args": {"photo": {"$artifact": "a" * 32}}}))
    plain = create(store, "batch", step("s"))

    got = dispatcher.take(CPU, claimant())
    assert got is not None and got.claim is None and got.item.envelope.job_id == with_ref
    assert client.zcard(dispatching) == 1
    claim = store.attempts.claim(got.item.envelope, node="here", pid=os.getpid(), lease_ttl=30, token="t")
    assert claim.verdict == "run" and client.zcard(dispatching) == 0

    taken = dispatcher.scheduler.take(CPU, claimant(), placed_plugins=["sleep"])
    assert taken is not None
    item, unclaimed = taken
    assert item.envelope.job_id == plain and unclaimed is None


def test_take_sends_a_subtask_pinned_to_another_box_there(redis_server: RedisServer) -> None:
    store, dispatcher = dispatcher_on(redis_server)
    pinned_step = step("s").model_copy(update={"node": "elsewhere"})
    pinned = create(store, "normal", pinned_step)
    mine = create(store, "batch", step("s"))

    assert dispatcher.take(CPU, claimant()) is None  # the pinned one scores lowest: sent to its box
    client = redis_server.client()
    messages = [json.loads(raw) for key in client.keys("node.elsewhere.cpu*") for raw in client.lrange(key, 0, -1)]
    assert len(messages) == 1
    status = store.get_job(pinned)
    assert status is not None and status.subtasks[0].state == "queued"
    assert dispatcher.scheduler.queued_size(CPU) == 1
    got = dispatcher.take(CPU, claimant())
    assert got is not None and got.item.envelope.job_id == mine and got.claim is not None


def wait_backlog_only(cluster: Cluster, size: int) -> None:
    """Until `size` subtasks wait in the cpu backlog, none in its Celery queue, and it stays so
    past the router's next release rounds (which would release into a queue with room)."""
    scheduler = scheduler_of(cluster)

    def backlog_only() -> bool:
        return scheduler.backlog_size(CPU) == size and scheduler.queued_size(CPU) == 0

    wait_until(backlog_only, 10, what=f"{size} subtask(s) in the backlog only")
    time.sleep(3 * Settings().release_interval)
    assert backlog_only()


def chained_total(cluster: Cluster, node: str) -> float:
    """The node's `edgefleet_worker_subtasks_chained_total`, from its /metrics."""
    with cluster.client() as http:
        (url,) = [n["metrics_url"] for n in http.get("/v1/workers").json() if n["name"] == node]
    text = httpx.get(url, timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == metric_names.SUBTASKS_CHAINED
    )


@pytest.mark.cluster
@pytest.mark.parametrize("chain_max", [32, 0])
def test_a_freed_slot_runs_the_backlog_in_priority_order(
    cluster_factory: Callable[..., Cluster], chain_max: int
) -> None:
    """One slot, a target depth of 1, and a blocker holding the slot. Without chaining one job
    waits in the Celery queue and the rest in the backlog; with it the slot counts as a taker
    (it takes its next subtask itself within the chain's 60 s), so every job waits in the
    backlog. Once the blocker ends, the slot takes the backlog itself in the release order:
    every normal job before any batch one. Without chaining the queued one goes first."""
    cluster = one_slot_cluster(cluster_factory, EDGEFLEET_CHAIN_MAX=str(chain_max), EDGEFLEET_CHAIN_SECONDS="60")
    blocker = start_blocker(cluster)
    first = cluster.submit(sleep_body(0, "batch"))["id"]
    if chain_max:
        wait_backlog_only(cluster, 1)
    else:
        wait_queued_full(cluster)
    batch = [cluster.submit(sleep_body(0, "batch"))["id"] for _ in range(4)]
    normal = [cluster.submit(sleep_body(0, "normal"))["id"] for _ in range(4)]
    cancel(cluster, blocker)

    started: dict[str, float] = {}
    for job_id in [first, *batch, *normal]:
        done = cluster.wait_job(job_id, timeout=120)
        assert done["state"] == "succeeded", done
        assert done["subtasks"][0]["attempt"] == 1
        started[job_id] = done["subtasks"][0]["started_at"]
    order = sorted(started, key=lambda j: started[j])
    first_batch = min(order.index(j) for j in batch)
    late_normal = [j for j in normal if order.index(j) > first_batch]
    chained = chained_total(cluster, "n1")
    if chain_max:
        assert chained >= 1
        assert not late_normal, order
    else:
        assert chained == 0
        assert order[0] == first and not late_normal, order  # first was in the queue before the others


@pytest.mark.cluster
def test_a_job_that_arrives_while_the_slot_lingers_runs_on_its_chain(cluster_factory: Callable[..., Cluster]) -> None:
    """One slot: the first job comes by a Celery message; once it has run, the slot lingers for
    the chain's time, so the next job gets no message and the slot takes it itself."""
    cluster = one_slot_cluster(cluster_factory, EDGEFLEET_CHAIN_SECONDS="30")
    first = cluster.submit(sleep_body(0))["id"]
    assert cluster.wait_job(first)["state"] == "succeeded"
    assert chained_total(cluster, "n1") == 0
    second = cluster.submit(sleep_body(0))["id"]
    assert cluster.wait_job(second)["state"] == "succeeded"
    assert chained_total(cluster, "n1") == 1  # taken by the chain, not delivered


@pytest.mark.cluster
def test_a_pool_process_killed_in_a_chained_subtask_loses_nothing(cluster_factory: Callable[..., Cluster]) -> None:
    """A subtask taken by a chain has no Celery message of its own: it comes back through the
    node's watch of its pool processes, as a delivered one does, and runs once to the end."""
    cluster = one_slot_cluster(cluster_factory, EDGEFLEET_CHAIN_SECONDS="60")
    blocker = start_blocker(cluster)
    waiting = cluster.submit(sleep_body(0, "batch"))["id"]  # no message: the blocker's slot takes it
    wait_backlog_only(cluster, 1)
    marker = new_marker("chained.txt")
    chained = cluster.submit(sleep_body(5, "normal", step={"args": {"seconds": 5, "marker": str(marker)}}))["id"]
    cancel(cluster, blocker)  # its slot ends, and takes the backlog's head itself
    wait_until(lambda: marker_lines(marker), 60, what="the chained subtask running")
    assert cluster.job(waiting)["subtasks"][0]["state"] == "ready"  # passed over: it scores after
    pool_process_running(cluster, chained, "s").kill()

    done = assert_succeeded_exactly_once(cluster, chained)
    assert len(marker_lines(marker)) == 2
    assert done["subtasks"][0]["attempt"] == 2
    requeued = subtask_events(cluster, chained, "s", "requeued")
    assert len(requeued) == 1 and "died" in requeued[0]["error"], requeued
    assert cluster.wait_job(waiting)["state"] == "succeeded"
    assert chained_total(cluster, "n1") >= 1


def test_a_completion_asks_for_a_refill_only_when_the_queue_has_room(redis_server: RedisServer) -> None:
    """The worker's refill after each subtask is a release; with the queue at its target depth
    (as it stays while slots chain) that release would find nothing, so it is not asked for."""
    store, dispatcher = dispatcher_on(redis_server)
    dispatcher.scheduler.set_target_depth(CPU, 1, reason="test")
    for _ in range(4):
        create(store, "batch", step("s"))
    (in_queue,) = dispatcher.release_items(CPU)

    def claim(item: Released) -> None:
        token = item.dispatch_member
        assert (
            store.attempts.claim(item.envelope, node="here", pid=1, lease_ttl=30, max_lost=3, token=token).verdict
            == "run"
        )

    def run_one() -> list[ResourceClass]:
        got = dispatcher.take(CPU, Claimant(node="here", pid=1, lease_ttl=30, max_lost=3, token="t"))
        assert got is not None and got.claim is not None and got.claim.verdict == "run"
        done = store.attempts.complete(got.item.envelope, node="here", pid=1, outcome="succeeded", output=None)
        assert done.accepted
        return done.ready_classes

    assert run_one() == []  # backlog left, but the queue is full
    for _ in range(2):
        create(store, "interactive", step("s"))
    # Interactive work waits: the express lane may release it past the target depth.
    assert run_one() == [CPU]
    assert run_one() == []  # the last interactive one ran: the queue is full again
    claim(in_queue)  # its delivery arrived: room in the queue
    assert run_one() == [CPU]


def test_a_slot_that_takes_its_next_subtask_itself_needs_no_message(redis_server: RedisServer) -> None:
    """A claim from a chaining slot (`takes_for`) counts the slot among its class's takers until
    its subtask ends or that time is up: releases leave the queue that much emptier, since the
    slot will take from the backlog itself."""
    store, dispatcher = dispatcher_on(redis_server)
    scheduler = dispatcher.scheduler
    scheduler.set_target_depth(CPU, 3, reason="test")
    for _ in range(6):
        create(store, "batch", step("s"))
    (delivered,) = dispatcher.release_items(CPU, max_count=1)
    # A delivery claimed by a slot that chains, and a subtask another chaining slot took itself.
    claim = store.attempts.claim(delivered.envelope, node="here", pid=1, lease_ttl=30, token="a", takes_for=30)
    assert claim.verdict == "run"
    taken = dispatcher.take(CPU, Claimant(node="here", pid=2, lease_ttl=30, max_lost=3, token="b", takes_for=0.5))
    assert taken is not None and taken.claim is not None
    assert len(dispatcher.release_items(CPU)) == 1  # a target depth of 3, less two takers
    assert scheduler.queued_size(CPU) == 1

    # The first slot's subtask ends with a plain completion (its chain takes nothing more).
    store.attempts.complete(delivered.envelope, node="here", pid=1, outcome="succeeded", output=None)
    assert len(dispatcher.release_items(CPU)) == 1
    # The second slot's time is up (its subtask runs on): it counts no more.
    wait_until(lambda: dispatcher.release_items(CPU), 10, what="the second taker's time up")
    assert scheduler.queued_size(CPU) == 3


def test_a_slot_with_nothing_to_take_lingers_until_work_wakes_it(redis_server: RedisServer) -> None:
    """A take (or completion) that finds nothing while the chain has time left leaves the slot
    lingering: still a taker, so releases keep no message for it, and woken by a token when work
    is made ready. Its last take, with no time left, ends that in the call that finds nothing."""
    store, dispatcher = dispatcher_on(redis_server)
    scheduler = dispatcher.scheduler
    scheduler.set_target_depth(CPU, 1, reason="test: the lingering slot is the one taker")
    client = redis_server.client()
    keys = Keys(store.connection.keys.prefix)
    takers, wake, lingering = keys.takers(CPU), keys.wake(CPU), keys.key("lingering", resource_class="cpu")
    pid = os.getpid()

    def me(token: str, takes_for: float = 30.0) -> Claimant:
        return Claimant(node="here", pid=pid, lease_ttl=30, max_lost=3, token=token, takes_for=takes_for)

    create(store, "batch", step("s"))
    got = dispatcher.take(CPU, me("1"))
    assert got is not None and client.zcard(takers) == 1 and client.zcard(lingering) == 0
    ended = completion_argv(got.item.envelope, node="here", pid=pid, outcome="succeeded", output=None)
    client.zadd(lingering, {"here|1": 1.0})  # a process that died lingering, long ago
    done, following = dispatcher.complete_and_take(ended, CPU, me("2"))
    assert done.accepted and following is None
    assert client.zcard(takers) == 1 and client.zrange(lingering, 0, -1) == [f"here|{pid}"]  # the dead one pruned
    assert not scheduler.wait_for_work(CPU, 0.01)

    first, second = create(store, "normal", step("s")), create(store, "normal", step("s"))
    assert client.llen(wake) == 1  # one token per lingering slot, however much arrives
    assert dispatcher.release_items(CPU) == []  # a target depth of 1, and the slot takes itself
    assert scheduler.wait_for_work(CPU, 10)
    got = dispatcher.take(CPU, me("3"))
    assert got is not None and got.claim is not None and got.item.envelope.job_id == first
    assert client.zcard(lingering) == 0 and client.zcard(takers) == 1
    store.attempts.complete(got.item.envelope, node="here", pid=pid, outcome="succeeded", output=None)
    assert client.zcard(takers) == 0  # a plain completion: the chain takes nothing more

    # The chain's time is up: its last take finds the second job (claimed, no longer a taker),
    # then one that finds nothing ends the registration.
    got = dispatcher.take(CPU, me("4", takes_for=0))
    assert got is not None and got.item.envelope.job_id == second and client.zcard(takers) == 0
    store.attempts.complete(got.item.envelope, node="here", pid=pid, outcome="succeeded", output=None)
    assert dispatcher.take(CPU, me("5")) is None and client.zcard(lingering) == 1
    assert dispatcher.take(CPU, me("6", takes_for=0)) is None
    assert client.zcard(lingering) == 0 and client.zcard(takers) == 0
    create(store, "normal", step("s"))
    assert client.llen(wake) == 0  # nobody lingers: no token
    assert len(dispatcher.release_items(CPU)) == 1


def test_a_release_says_which_subtasks_read_artifacts(redis_server: RedisServer) -> None:
    """Locality asks where a subtask's inputs are only for those that have any: a `$artifact`
    in its args, or steps it needs (their files)."""
    store, dispatcher = dispatcher_on(redis_server)
    plain = create(store, "batch", step("s"))
    with_ref = create(store, "batch", step("s").model_copy(update={"args": {"photo": {"$artifact": "a" * 32}}}))
    first_of_two = create(store, "batch", step("a", dependents=("b",)), step("b", needs=("a",)))
    released = {item.envelope.job_id: item for item in dispatcher.scheduler.release(CPU, 10, 10)}
    assert released[plain].has_inputs is False
    assert released[with_ref].has_inputs is True
    assert released[first_of_two].has_inputs is False  # `a` needs nothing
    item = released[first_of_two]
    claim = store.attempts.claim(item.envelope, node="here", pid=1, lease_ttl=30, max_lost=3, token="t")
    assert claim.verdict == "run"
    store.attempts.complete(item.envelope, node="here", pid=1, outcome="succeeded", output=None)
    (second,) = dispatcher.scheduler.release(CPU, 10, 10)
    assert second.envelope.subtask_id == "b" and second.has_inputs is True


def test_a_completion_takes_the_slots_next_subtask_in_the_same_call(redis_server: RedisServer) -> None:
    store, dispatcher = dispatcher_on(redis_server)
    first, second = create(store, "normal", step("s")), create(store, "batch", step("s"))
    got = dispatcher.take(CPU, claimant())
    assert got is not None and got.claim is not None and got.item.envelope.job_id == first
    ended = completion_argv(got.item.envelope, node="here", pid=os.getpid(), outcome="succeeded", output={"n": 1})

    done, following = dispatcher.complete_and_take(ended, CPU, claimant())
    assert done.accepted and done.job_state == "succeeded"
    assert following is not None and following.claim is not None and following.claim.verdict == "run"
    assert following.item.envelope.job_id == second
    status = store.get_job(second)
    assert status is not None and status.subtasks[0].state == "running"

    # The same end again (a retry after a lost reply): refused as stale, and nothing is taken.
    create(store, "batch", step("s"))
    done, following = dispatcher.complete_and_take(ended, CPU, claimant())
    assert not done.accepted and following is None
    assert dispatcher.scheduler.backlog_size(CPU) == 1
    # Nothing ready: the end is recorded, nothing taken.
    later = completion_argv(
        dispatcher.take(CPU, claimant()).item.envelope,  # type: ignore[union-attr]
        node="here",
        pid=os.getpid(),
        outcome="failed",
        error="boom",
        retryable=False,
    )
    done, following = dispatcher.complete_and_take(later, CPU, claimant())
    assert done.accepted and done.job_state == "failed" and following is None
