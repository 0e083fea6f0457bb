"""The release scheduler: effective priority, fairness, aging, deadlines, rescoring, the lease.

Cluster tests run one cpu node with one slot and a target depth of 1, and hold that
slot with a long "blocker" job while the backlog is built; cancelling the blocker
lets the backlog drain. Assertions are about the order in which subtasks started
(their `started_at`), never about how long anything took.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.keys import Keys
from edgefleet.scheduling import priority
from edgefleet.scheduling.priority import DEFAULT_WEIGHTS, EPOCH
from edgefleet.scheduling.state import SchedulerState
from edgefleet.schemas import ResourceClass
from edgefleet.store import JobStore
from edgefleet.store.scripts import compose
from tests.conftest import Cluster, RedisServer, free_port, stop_process, wait_until

pytestmark = pytest.mark.cluster

ONE_SLOT = {
    "EDGEFLEET_TARGET_DEPTH": json.dumps({"cpu": 1, "gpu": 1, "io": 1}),
    "EDGEFLEET_CPU_CONCURRENCY": "1",
    "EDGEFLEET_SCHEDULER_LEASE_TTL": "2",
    # The feedback loop (tested on its own) would move target depths and weights mid-test.
    "EDGEFLEET_FEEDBACK_INTERVAL": "3600",
    # These tests are about the order of one slot; the express lane has its own test.
    "EDGEFLEET_EXPRESS_SLOTS": "0",
}


# --- the formula ------------------------------------------------------------------------
# The formula exists once, in Lua (edgefleet/scheduling/lua/score.lua): these tests run it in
# a real Redis, composed and loaded the way the store loads every script, with the weights
# read from Redis as the release script reads them.

Score = Callable[..., float]

SCORE_OF = """
local deadline = nil
if ARGV[5] ~= '' then deadline = tonumber(ARGV[5]) end
local s = effective_score(load_weights(), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), deadline)
return string.format('%.17g', s)
"""


@pytest.fixture
def score(redis_server: RedisServer) -> Score:
    """score(priority=, ready_at=, tenant_load=0, deadline_at=None, weights=None): the backlog
    score Redis computes, with `weights` (over the defaults) in the store's weights hash."""
    client = redis_server.client()
    script = client.register_script(compose(SCORE_OF))
    keys = Keys("score-test")

    def score(
        *,
        priority: str,
        ready_at: float,
        tenant_load: int = 0,
        deadline_at: float | None = None,
        weights: dict[str, float] | None = None,
    ) -> float:
        client.delete(keys.key("weights"))
        if weights:
            client.hset(keys.key("weights"), mapping=weights)
        deadline = "" if deadline_at is None else repr(deadline_at)
        return float(script(keys=[], args=[keys.prefix, priority, repr(ready_at), tenant_load, deadline]))

    return score


def test_class_weight_is_a_head_start_that_waiting_overcomes(score: Score) -> None:
    t = EPOCH + 1000.0
    assert score(priority="interactive", ready_at=t) < score(priority="batch", ready_at=t)
    # A batch item that waited longer than the gap (600 s) goes first; a shorter wait does not.
    assert score(priority="batch", ready_at=t - 601) < score(priority="interactive", ready_at=t)
    assert score(priority="batch", ready_at=t - 599) > score(priority="interactive", ready_at=t)
    # The aging factor scales waiting time: at aging 10 the gap is 60 s of waiting.
    w = {"aging": 10.0}
    assert score(priority="batch", ready_at=t - 61, weights=w) < score(priority="interactive", ready_at=t, weights=w)
    assert score(priority="batch", ready_at=t - 59, weights=w) > score(priority="interactive", ready_at=t, weights=w)


def test_fairness_sinks_a_flooding_tenants_tail(score: Score) -> None:
    t = EPOCH + 1000.0
    flood_tail = score(priority="batch", ready_at=t, tenant_load=100)
    light = score(priority="batch", ready_at=t + 10, tenant_load=0)
    assert light < flood_tail
    assert score(priority="batch", ready_at=t, tenant_load=100, weights={"fairness": 0}) < light


def test_deadline_caps_the_score_at_the_latest_start_time(score: Score) -> None:
    t = EPOCH + 1000.0
    near = score(priority="batch", ready_at=t, deadline_at=t + 30)
    assert near < score(priority="batch", ready_at=t - 500)  # ahead of older batch work
    # It ranks like interactive work that became ready at its latest start time (t + 25).
    assert score(priority="interactive", ready_at=t + 24) < near < score(priority="interactive", ready_at=t + 26)
    expected = DEFAULT_WEIGHTS["aging"] * (t + 30 - DEFAULT_WEIGHTS["expected_run_s"] - EPOCH) - 600
    assert near == pytest.approx(expected)
    # A far deadline changes nothing.
    assert score(priority="batch", ready_at=t, deadline_at=t + 86400) == score(priority="batch", ready_at=t)


def test_weights_are_validated() -> None:
    assert priority.validate_weights({"batch": 5}) == {"batch": 5.0}
    for bad in (
        {"nope": 1},
        {"aging": 0},
        {"batch": -1},
        {"fairness": float("nan")},
        {"batch_min_share": 1.5},
        {"share_window_s": 0},
    ):
        with pytest.raises(ValueError):
            priority.validate_weights(bad)


def test_the_score_follows_the_weights_in_redis(score: Score) -> None:
    """Far from the epoch (sub-millisecond resolution kept), with aging 2 and fairness 3 stored:
    aging x waited - class weight + fairness x load, capped by a near deadline only."""
    weights = {"aging": 2.0, "fairness": 3.0}
    t = EPOCH + 95_000_000.25
    aged = 2 * (t - EPOCH)
    assert score(priority="batch", ready_at=t, weights=weights) == pytest.approx(aged, abs=1e-3)
    assert score(priority="interactive", ready_at=t, tenant_load=4, weights=weights) == pytest.approx(
        aged - 600 + 3 * 4, abs=1e-3
    )
    # The latest start is 40 - expected_run_s (5) seconds on: ranked like top-class work ready then.
    near = 2 * (t + 40 - 5 - EPOCH) - 600
    assert score(priority="normal", ready_at=t, tenant_load=2, deadline_at=t + 40, weights=weights) == pytest.approx(
        near, abs=1e-3
    )
    assert score(priority="batch", ready_at=t, tenant_load=1, deadline_at=t + 1e6, weights=weights) == pytest.approx(
        aged + 3, abs=1e-3
    )
    # A stored weight that is not a number is ignored: the default stands.
    junk: dict[str, Any] = {"aging": "fast"}
    assert score(priority="batch", ready_at=t, weights=junk) == score(priority="batch", ready_at=t)


def _released_priorities(scheduler: SchedulerState, count: int) -> list[str]:
    out = []
    for _ in range(count):
        [item] = scheduler.release(ResourceClass.cpu, 1, 10_000)
        out.append(item.envelope.priority.value)
    return out


@pytest.mark.parametrize("share", [0.0, 0.25])
def test_batch_keeps_its_minimum_share_of_releases(redis_server: RedisServer, share: float) -> None:
    """Interactive work fills the backlog ahead of batch; with a minimum share batch still gets
    that fraction of the releases (and not much more); without one it waits for the gap."""
    from tests.test_backlog_metric import create, step

    store = JobStore.from_url(redis_server.url)
    scheduler = SchedulerState.of(store)
    scheduler.seed_weights(dict(DEFAULT_WEIGHTS))
    scheduler.set_weights({"batch_min_share": share}, reason="test")
    batch = [create(store, "batch", step("s")) for _ in range(20)]
    interactive = [create(store, "interactive", step("s")) for _ in range(60)]
    assert len(batch) + len(interactive) == scheduler.backlog_size(ResourceClass.cpu)
    released = _released_priorities(scheduler, 40)
    batch_share = released.count("batch") / len(released)
    if share == 0:
        assert released == ["interactive"] * 40
    else:
        assert share <= batch_share <= share + 0.1, released
        assert released[0] == "interactive"  # nothing released yet: the score decides
    # The share is a floor while batch waits, not a quota: alone, interactive work takes every slot.
    scheduler.set_weights({"batch_min_share": 0.5}, reason="test")
    for job_id in batch:
        store.cancel_job(job_id)
    rest = _released_priorities(scheduler, scheduler.backlog_size(ResourceClass.cpu))
    assert rest and set(rest) == {"interactive"}


# --- helpers for the cluster tests ----------------------------------------------------------


def sleep_body(seconds: float, prio: str = "batch", **extra: Any) -> dict[str, Any]:
    step = {"id": "s", "plugin": "sleep", "action": "sleep", "args": {"seconds": seconds}}
    step.update(extra.pop("step", {}))
    return {"steps": [step], "priority": prio, **extra}


def one_slot_cluster(cluster_factory: Callable[..., Cluster], **env: str) -> Cluster:
    cluster = cluster_factory(**{**ONE_SLOT, **env})
    cluster.start_router()
    cluster.start_node("n1", classes="cpu")
    cluster.wait_nodes_ready("n1")
    return cluster


def scheduler_of(cluster: Cluster) -> SchedulerState:
    return SchedulerState.of(JobStore.from_url(cluster.redis.url))


def start_blocker(cluster: Cluster) -> str:
    """A long job that holds the node's only slot until it is cancelled."""
    job = cluster.submit(sleep_body(600))
    wait_until(lambda: cluster.job(job["id"])["subtasks"][0]["state"] == "running", 30, what="blocker running")
    return job["id"]


def cancel(cluster: Cluster, job_id: str) -> None:
    with cluster.client() as http:
        assert http.delete(f"/v1/jobs/{job_id}").status_code == 202


def wait_queued_full(cluster: Cluster) -> None:
    scheduler = scheduler_of(cluster)
    wait_until(lambda: scheduler.queued_size(ResourceClass.cpu) == 1, 10, what="the queued slot taken")


def start_order(cluster: Cluster, job_ids: list[str]) -> list[str]:
    """The jobs (all must succeed) by when their subtask started."""
    started = {}
    for job_id in job_ids:
        done = cluster.wait_job(job_id, timeout=120)
        assert done["state"] == "succeeded", done
        started[job_id] = done["subtasks"][0]["started_at"]
    return sorted(job_ids, key=lambda j: started[j])


def backlog_jobs(cluster: Cluster) -> list[str]:
    return [m.split("|")[0] for m, _ in scheduler_of(cluster).backlog_order(ResourceClass.cpu)]


def redis_now(cluster: Cluster) -> float:
    seconds, micros = cluster.redis.client().time()
    return seconds + micros / 1e6


# --- the scheduler in a real cluster ----------------------------------------------------------


def test_interactive_overtakes_a_queued_batch_backlog(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = one_slot_cluster(cluster_factory)
    blocker = start_blocker(cluster)
    batch = [cluster.submit(sleep_body(0.2))["id"] for _ in range(20)]
    interactive = [cluster.submit(sleep_body(0.2, "interactive"))["id"] for _ in range(3)]
    assert set(backlog_jobs(cluster)[:3]) == set(interactive)
    cancel(cluster, blocker)
    order = start_order(cluster, batch + interactive)
    for job_id in interactive:
        batch_before = [j for j in order[: order.index(job_id)] if j in batch]
        assert len(batch_before) <= 2, order  # only what was already released when it arrived
    with cluster.client() as http:
        state = http.get("/v1/scheduler").json()
    assert state["backlog"]["cpu"] == 0 and state["target_depth"]["cpu"] == 1


def test_flooding_tenant_does_not_starve_another(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = one_slot_cluster(cluster_factory)
    blocker = start_blocker(cluster)
    alice = [cluster.submit(sleep_body(0.1), token="alice-token")["id"] for _ in range(30)]
    bob = [cluster.submit(sleep_body(0.1), token="bob-token")["id"] for _ in range(3)]
    assert scheduler_of(cluster).tenant_active("alice") == 30
    cancel(cluster, blocker)
    order = start_order(cluster, alice + bob)
    for job_id in bob:
        alice_after = [j for j in order[order.index(job_id) :] if j in alice]
        assert len(alice_after) >= 20, order
    # Every counted subtask was settled when it finished.
    scheduler = scheduler_of(cluster)
    assert scheduler.tenant_active("alice") == 0 and scheduler.tenant_active("bob") == 0


def test_aging_lets_old_batch_work_through(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = one_slot_cluster(cluster_factory)
    scheduler = scheduler_of(cluster)
    scheduler.set_weights({"interactive": 1.5, "normal": 0.5, "batch": 0, "fairness": 0}, "test: small class gap")
    blocker = start_blocker(cluster)
    filler = cluster.submit(sleep_body(0.1))["id"]
    wait_queued_full(cluster)
    old_batch = cluster.submit(sleep_body(0.1))["id"]
    ready_at = float(cluster.redis.client().hget(f"ef:st:{old_batch}:s", "ready_at"))
    wait_until(lambda: redis_now(cluster) > ready_at + 2.0, 10, what="the old batch item to age past the gap")
    young_batch = cluster.submit(sleep_body(0.1))["id"]
    interactive = cluster.submit(sleep_body(0.1, "interactive"))["id"]
    # Interactive still beats batch work of its own age, but not batch work older than the gap.
    assert backlog_jobs(cluster) == [old_batch, interactive, young_batch]
    cancel(cluster, blocker)
    assert start_order(cluster, [filler, old_batch, young_batch, interactive]) == [
        filler,
        old_batch,
        interactive,
        young_batch,
    ]


def test_a_deadline_job_jumps_ahead(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = one_slot_cluster(cluster_factory)
    blocker = start_blocker(cluster)
    batch = [cluster.submit(sleep_body(0.1), token="alice-token")["id"] for _ in range(10)]
    far = cluster.submit(sleep_body(0.1, deadline_s=7200), token="alice-token")["id"]
    near = cluster.submit(sleep_body(0.1, deadline_s=120), token="alice-token")["id"]
    assert cluster.job(near)["deadline_at"] is not None
    backlog = backlog_jobs(cluster)
    assert backlog[0] == near and backlog[-1] == far
    cancel(cluster, blocker)
    order = start_order(cluster, [*batch, far, near])
    assert order.index(near) <= 1 and order[-1] == far, order


def test_rescore_after_a_weight_change_reorders_the_backlog(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = one_slot_cluster(cluster_factory)
    blocker = start_blocker(cluster)
    normal = [cluster.submit(sleep_body(0.1, "normal"))["id"] for _ in range(5)]
    batch = [cluster.submit(sleep_body(0.1))["id"] for _ in range(5)]
    waiting_normal = normal[1:]  # the first one was released into the free queued slot
    assert backlog_jobs(cluster) == waiting_normal + batch
    scheduler = scheduler_of(cluster)
    rescored = scheduler.set_weights({"batch": 1000}, "test: batch objective missed")
    assert rescored == 9
    assert backlog_jobs(cluster) == batch + waiting_normal
    with cluster.client("reader-token") as http:
        state = http.get("/v1/scheduler").json()
    assert state["weights"]["batch"] == 1000
    change = state["last_changes"][0]
    assert change["reason"] == "test: batch objective missed" and change["changes"]["batch"]["new"] == 1000
    cancel(cluster, blocker)
    order = start_order(cluster, normal + batch)
    assert max(order.index(j) for j in batch) < min(order.index(j) for j in waiting_normal), order


def test_router_restart_keeps_backlog_and_weights(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = one_slot_cluster(cluster_factory)
    scheduler = scheduler_of(cluster)
    scheduler.set_weights({"interactive": 300, "fairness": 2}, "test")
    scheduler.set_target_depth(ResourceClass.cpu, 1, "test: one slot")
    blocker = start_blocker(cluster)
    jobs = [cluster.submit(sleep_body(0.1))["id"] for _ in range(5)]
    with cluster.client() as http:
        before = http.get("/v1/scheduler").json()
    assert before["backlog"]["cpu"] == 4
    cluster.stop_router(signal.SIGKILL)
    cluster.start_router()
    with cluster.client() as http:
        after = http.get("/v1/scheduler").json()
    assert after["weights"] == before["weights"] and after["weights"]["interactive"] == 300
    assert after["backlog"]["cpu"] == 4 and after["target_depth"] == before["target_depth"]
    assert [c["reason"] for c in after["last_changes"]] == ["test: one slot", "test"]
    cancel(cluster, blocker)
    start_order(cluster, jobs)  # all drain and succeed
    wait_until(lambda: cluster.job(blocker)["state"] == "cancelled", 10)


def test_only_the_lease_holder_runs_the_release_loop(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = cluster_factory(
        EDGEFLEET_ROUTER_ID="router-a", EDGEFLEET_SCHEDULER_LEASE_TTL="2", EDGEFLEET_FEEDBACK_INTERVAL="3600"
    )
    cluster.start_router()
    scheduler = scheduler_of(cluster)
    wait_until(lambda: scheduler.leader() == "router-a", 10, what="router-a leads")
    port_b = free_port()
    url_b = f"http://127.0.0.1:{port_b}"
    router_b = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "router"],
        env=cluster.env(EDGEFLEET_ROUTER_ID="router-b", EDGEFLEET_ROUTER_PORT=str(port_b), EDGEFLEET_ROUTER_URL=url_b),
        stdout=cluster._log("router-b"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: _healthy(url_b), 30, what="router-b")
        cluster.start_node("n1", classes="cpu")
        cluster.wait_nodes_ready("n1")
        # A retry waits in the delayed set, which only the release loop drains.
        retrying = sleep_body(
            0.05, step={"args": {"seconds": 0.05, "fail_times": 1}, "retries": 1, "retry_backoff": 0.1}
        )
        headers = {"Authorization": "Bearer alice-token"}
        ids = []
        for base in (cluster.url, url_b) * 2:
            response = httpx.post(f"{base}/v1/jobs", json=retrying, headers=headers, timeout=30)
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
        for job_id in ids:
            done = cluster.wait_job(job_id)
            assert done["state"] == "succeeded" and done["subtasks"][0]["attempt"] == 2, done
        released = scheduler.loop_released()
        assert released.get("router-a", 0) >= 4 and "router-b" not in released
        # Both routers watch the finishes; each is counted by one of them.
        admin = {"Authorization": "Bearer test-admin-token"}

        def finished_counted() -> float:
            total = 0.0
            for base in (cluster.url, url_b):
                text = httpx.get(f"{base}/metrics", headers=admin, timeout=10).text
                for family in text_string_to_metric_families(text):
                    for sample in family.samples:
                        if sample.name == "edgefleet_jobs_finished_total" and sample.labels.get("state") == "succeeded":
                            total += sample.value
            return total

        wait_until(lambda: finished_counted() == len(ids), 15, what="finishes counted")
        time.sleep(2.5)  # both watchers have scanned again since
        assert finished_counted() == len(ids)
        state_b = httpx.get(f"{url_b}/v1/scheduler", headers=headers, timeout=10).json()
        assert state_b["router_id"] == "router-b" and state_b["leader"] == "router-a"

        # The leader dies: its lease expires and the other router takes over.
        cluster.stop_router(signal.SIGKILL)
        cluster.router_port = port_b  # the cluster's helpers talk to router-b from now on
        wait_until(lambda: scheduler.leader() == "router-b", 15, what="router-b takes the lease")
        response = httpx.post(f"{url_b}/v1/jobs", json=retrying, headers=headers, timeout=30)
        done = cluster.wait_job(response.json()["id"])
        assert done["state"] == "succeeded" and scheduler.loop_released().get("router-b", 0) >= 1
    finally:
        stop_process(router_b)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_an_admin_changes_weights_over_http_and_bad_values_name_the_weight(router_only: Cluster) -> None:
    scheduler = scheduler_of(router_only)
    with router_only.client() as http:
        changed = http.put(
            "/v1/scheduler/weights", json={"weights": {"batch_min_share": 0.2}, "reason": "nightly batch"}
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["weights"]["batch_min_share"] == 0.2
        shown = http.get("/v1/scheduler").json()
        assert shown["weights"]["batch_min_share"] == 0.2
        assert any(c.get("reason") == "nightly batch" for c in shown["last_changes"]), shown["last_changes"]
        for body, field in (
            ({"weights": {"batch_min_share": 2}, "reason": "x"}, "weights.batch_min_share"),
            ({"weights": {"speed": 1}, "reason": "x"}, "weights.speed"),
            ({"weights": {"aging": 0, "batch": 1}, "reason": "x"}, "weights.aging"),
            ({"weights": {}, "reason": "x"}, "weights"),
            ({"weights": {"batch": 1}}, "reason"),
        ):
            bad = http.put("/v1/scheduler/weights", json=body)
            assert bad.status_code == 422, bad.text
            assert field in [d["field"] for d in bad.json()["detail"]], bad.json()
    assert scheduler.weights()["batch"] == 0.0  # a refused change changes nothing
    with router_only.client("alice-token") as reader:
        assert reader.put("/v1/scheduler/weights", json={"weights": {"batch": 1}, "reason": "x"}).status_code == 403


def test_the_express_lane_runs_interactive_work_while_batch_holds_every_slot(
    cluster_factory: Callable[..., Cluster],
) -> None:
    cluster = one_slot_cluster(cluster_factory, EDGEFLEET_EXPRESS_SLOTS="1")
    with cluster.client() as http:
        [node] = http.get("/v1/workers").json()
    assert node["express_slots"] == {"cpu": 1}
    blocker = start_blocker(cluster)
    backlog = [cluster.submit(sleep_body(0))["id"] for _ in range(3)]
    wait_queued_full(cluster)
    interactive = cluster.submit(sleep_body(0, "interactive"))
    done = cluster.wait_job(interactive["id"], timeout=60)
    assert done["state"] == "succeeded", done
    # It ran beside the blocker, which still holds the only normal slot, and ahead of the backlog.
    assert cluster.job(blocker)["subtasks"][0]["state"] == "running"
    assert all(cluster.job(j)["subtasks"][0]["state"] in ("ready", "queued") for j in backlog)
    assert cluster.redis.client().hget(f"ef:st:{interactive['id']}:s", "queue") == "cpu.express"
    cancel(cluster, blocker)
    for job_id in backlog:
        assert cluster.wait_job(job_id, timeout=60)["state"] == "succeeded"
