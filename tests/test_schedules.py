"""Schedules: jobs at fire times, exactly once each, through router kills, restarts and a second router.

Real redis-server and routers (no workers: a scheduled job waits in its backlog, so it stays
running, which is what the overlap test needs). "Exactly once" is checked by accounting: the
runs a schedule records cover its fire times contiguously, each fire time once, and the jobs
named after the schedule are exactly the jobs those runs name (a second job for one fire time
would be a job no run names).
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from edgefleet.settings import Settings
from edgefleet.store import JobStore
from edgefleet.store.schedules import ScheduleStore
from tests.conftest import TOKENS, Cluster, RedisServer, free_port, wait_until

pytestmark = pytest.mark.cluster

ENV = {"EDGEFLEET_SCHEDULE_MIN_INTERVAL": "1", "EDGEFLEET_SCHEDULER_LEASE_TTL": "2", "EDGEFLEET_SCHEDULE_TICK": "0.2"}
JOB = {"steps": [{"id": "count", "plugin": "text", "action": "count", "args": {"text": "a b a"}}]}
WAIT = 60.0


def create(cluster: Cluster, token: str = "alice-token", **fields: Any) -> dict[str, Any]:
    body = {"job": JOB, "interval_s": 1.0, **fields}
    with cluster.client(token) as http:
        response = http.post("/v1/schedules", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def get(cluster: Cluster, schedule_id: str, token: str = "alice-token") -> dict[str, Any]:
    with cluster.client(token) as http:
        response = http.get(f"/v1/schedules/{schedule_id}", params={"runs": 10_000})
    assert response.status_code == 200, response.text
    return dict(response.json())


def action(cluster: Cluster, schedule_id: str, verb: str, token: str = "alice-token") -> dict[str, Any]:
    with cluster.client(token) as http:
        response = http.post(f"/v1/schedules/{schedule_id}/{verb}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def runs(cluster: Cluster, schedule_id: str) -> list[dict[str, Any]]:
    """Oldest first."""
    return list(reversed(get(cluster, schedule_id)["last_runs"]))


def created(cluster: Cluster, schedule_id: str) -> list[dict[str, Any]]:
    return [r for r in runs(cluster, schedule_id) if r["state"] == "created"]


def wait_created(cluster: Cluster, schedule_id: str, at_least: int) -> list[dict[str, Any]]:
    return list(
        wait_until(
            lambda: (found := created(cluster, schedule_id)) and len(found) >= at_least and found,
            WAIT,
            interval=0.2,
            what=f"{at_least} jobs of schedule {schedule_id}",
        )
    )


def settle(cluster: Cluster, schedule_id: str) -> dict[str, Any]:
    """Paused, with no claim still waiting for its job: its runs are final."""
    action(cluster, schedule_id, "pause")
    return dict(
        wait_until(
            lambda: (s := get(cluster, schedule_id)) and all(r["state"] != "pending" for r in s["last_runs"]) and s,
            WAIT,
            what="no pending run",
        )
    )


def ms(seconds: float) -> int:
    return round(seconds * 1000)


def assert_each_fire_time_once(cluster: Cluster, status: dict[str, Any], token: str = "alice-token") -> list[int]:
    """The fire times the runs cover, contiguous and each once; each created run has its own job,
    named after its fire time; no other job carries the schedule's name. Returns the fire times."""
    step = ms(status["interval_s"])
    records = list(reversed(status["last_runs"]))
    assert records, "the schedule never fired"
    covered: list[int] = []
    for record in records:
        first = ms(record["fire_at"])
        last = ms(record["until"]) if record["until"] is not None else first
        assert record["count"] == (last - first) // step + 1, record
        if covered:
            assert first == covered[-1] + step, f"fire times not contiguous at {record}: {records}"
        covered += list(range(first, last + step, step))
    made = {r["job_id"]: ms(r["fire_at"]) for r in records if r["state"] == "created"}
    assert len(made) == len([r for r in records if r["state"] == "created"]), "one job for two fire times"
    with cluster.client(token) as http:
        page = http.get("/v1/jobs", params={"limit": 500}).json()
    prefix = f"{status['name']}@"
    named = {job["id"]: job["name"] for job in page["jobs"] if (job["name"] or "").startswith(prefix)}
    assert set(named) == set(made), "jobs of the schedule differ from the jobs its runs name"
    for job_id, name in named.items():
        assert ms(datetime.fromisoformat(name[len(prefix) :]).timestamp()) == made[job_id]
    return covered


def test_fire_times_jitter_and_time_zones() -> None:
    from datetime import UTC

    from edgefleet.router.schedule_times import ScheduleClock
    from edgefleet.schedule_schemas import ScheduleRequest

    def clock(schedule_id: str, **timing: Any) -> ScheduleClock:
        return ScheduleClock.of(schedule_id, ScheduleRequest.model_validate({"job": JOB, **timing}))

    hour = 3_600_000
    hourly = clock("a", interval_s=3600.0, jitter_s=600.0)
    start = 1_796_000_123_456
    first = hourly.following(start)
    assert first % hour == 0 and start < first <= start + hour  # on the hour, from the epoch
    assert hourly.previous(first) == first - hour and hourly.following(first) == first + hour
    fires = hourly.times(start, 200)
    delays = [hourly.jitter(f) for f in fires]
    assert all(0 <= d <= 600_000 for d in delays) and len(set(delays)) > 150
    assert delays == [clock("a", interval_s=3600.0, jitter_s=600.0).jitter(f) for f in fires]  # any router
    assert delays != [clock("b", interval_s=3600.0, jitter_s=600.0).jitter(f) for f in fires]
    # 02:30 in Berlin is 01:30 UTC in winter and 00:30 UTC in summer.
    berlin = clock("c", cron="30 2 * * *", timezone="Europe/Berlin")
    for month, utc_hour in ((1, 1), (7, 0)):
        after = round(datetime(2026, month, 10, tzinfo=UTC).timestamp() * 1000)
        fire = datetime.fromtimestamp(berlin.following(after) / 1000, UTC)
        assert (fire.day, fire.hour, fire.minute) == (10, utc_hour, 30)
    winter = berlin.following(round(datetime(2026, 1, 10, tzinfo=UTC).timestamp() * 1000))
    assert berlin.count_between(winter, winter + 2 * 24 * hour, 100) == 3


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One redis-server and one router for the tests that do not stop it."""
    workdir = tmp_path_factory.mktemp("schedules")
    server = RedisServer(port=free_port(), data_dir=workdir / "redis")
    server.start()
    cluster = Cluster(redis=server, workdir=workdir, env_overrides=ENV)
    try:
        cluster.start_router()
        yield cluster
    finally:
        cluster.stop()
        server.stop()


BAD = [
    ({"cron": "61 * * * *", "interval_s": None}, "cron"),
    ({"cron": "every day", "interval_s": None}, "cron"),
    ({"cron": "0 0 30 2 *", "interval_s": None}, "cron"),  # February 30th: never
    ({"cron": "* * * * *"}, "interval_s"),  # both
    ({"interval_s": None}, "cron"),  # neither
    ({"interval_s": 0.5}, "interval_s"),  # under the router's minimum (1 s here)
    ({"cron": "* * * * * */2", "interval_s": None, "jitter_s": 2.5}, "jitter_s"),
    ({"timezone": "Mars/Olympus_Mons"}, "timezone"),
    ({"job": {"template": "no-such-template"}}, "job.template"),
    ({"job": {"steps": [{"id": "a", "plugin": "no_such_plugin", "action": "x"}]}}, "job.steps.0.plugin"),
    ({"job": {"template": "text-report", "steps": JOB["steps"]}}, "job.steps"),
    ({"job": {"goal": "count the words of my notes"}}, "job.goal"),
    ({"overlap": "sometimes"}, "overlap"),
    ({"missed": "all"}, "missed"),
]


@pytest.mark.parametrize(("fields", "field"), BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_input_is_a_422_naming_the_field(router: Cluster, fields: dict[str, Any], field: str) -> None:
    body = {"job": JOB, "interval_s": 5.0, **fields}
    with router.client("alice-token") as http:
        response = http.post("/v1/schedules", json={k: v for k, v in body.items() if v is not None})
    assert response.status_code == 422, response.text
    assert field in [item["field"] for item in response.json()["detail"]], response.text


def test_body_is_read_like_a_job_body(router: Cluster) -> None:
    """The same reader as POST /v1/jobs: JSON only, bounded before it is parsed."""
    with router.client("alice-token") as http:
        wrong_type = http.post("/v1/schedules", content=b"{}", headers={"Content-Type": "text/plain"})
        huge = http.post("/v1/schedules", json={"job": {"template": "x", "inputs": {"pad": "x" * 1_100_000}}})
        malformed = http.post("/v1/schedules", content=b"{", headers={"Content-Type": "application/json"})
    assert (wrong_type.status_code, wrong_type.json()["detail"][0]["field"]) == (415, "Content-Type")
    assert (huge.status_code, huge.json()["error"]) == (413, "payload_too_large")
    assert (malformed.status_code, malformed.json()["error"]) == (400, "malformed_json")


def test_tenancy_and_auth(router: Cluster) -> None:
    mine = create(router, name="alice-hourly", interval_s=3600.0)
    assert mine["tenant"] == "alice" and mine["state"] == "active"
    assert len(mine["next_fire_at"]) == 5 and all(t % 3600 == 0 for t in mine["next_fire_at"])
    with router.client("reader-token") as http:
        assert http.post("/v1/schedules", json={"job": JOB, "interval_s": 5.0}).status_code == 403
        assert http.get(f"/v1/schedules/{mine['id']}").status_code == 200  # same tenant, read scope
    with router.client("bob-token") as http:
        assert http.get(f"/v1/schedules/{mine['id']}").status_code == 404
        assert http.post(f"/v1/schedules/{mine['id']}/pause").status_code == 404
        assert http.delete(f"/v1/schedules/{mine['id']}").status_code == 404
        assert mine["id"] not in [s["id"] for s in http.get("/v1/schedules").json()["schedules"]]
    with router.client("nobody") as http:
        assert http.get("/v1/schedules").status_code == 401
    with router.client() as http:  # admin sees every tenant's
        assert mine["id"] in [s["id"] for s in http.get("/v1/schedules").json()["schedules"]]
    berlin = create(router, name="nightly", cron="30 2 * * *", interval_s=None, timezone="Europe/Berlin")
    assert all(t.endswith(("+01:00", "+02:00")) and "T02:30:00" in t for t in berlin["next_fire_local"])
    with router.client("alice-token") as http:
        for schedule in (mine, berlin):
            assert http.delete(f"/v1/schedules/{schedule['id']}").status_code == 204
            assert http.get(f"/v1/schedules/{schedule['id']}").status_code == 404


def test_cli_add_list_pause_resume_rm(router: Cluster) -> None:
    from typer.testing import CliRunner

    from edgefleet.cli import app

    env = {"EDGEFLEET_ROUTER_URL": router.url, "EDGEFLEET_TOKEN": "alice-token"}

    def cli(*args: str, code: int = 0) -> str:
        result = CliRunner().invoke(app, ["schedule", *args], env=env)
        assert result.exit_code == code, result.output
        return result.output

    job = ["-t", "text-report", "-i", "text=a b a"]
    assert "error: cron:" in cli("add", *job, "--cron", "61 * * * *", code=2)
    assert "error: job.template:" in cli("add", "-t", "no-such", "--every", "1h", code=2)
    sid = cli("add", *job, "--every", "1h", "--name", "cli-hourly", "--paused").split()[0]
    assert sid in cli("list") and "paused" in cli("pause", sid)
    assert "active" in cli("resume", sid)
    assert '"state": "active"' in cli("show", sid, "--json")
    assert "deleted" in cli("rm", sid)
    assert "no schedule" in cli("show", sid, code=2)


def test_overlap_skip_waits_for_the_running_job(router: Cluster) -> None:
    """No worker runs the job, so it runs until cancelled: meanwhile every fire time is skipped."""
    sid = create(router, name="overlap-skip", overlap="skip")["id"]
    first = wait_created(router, sid, 1)[0]
    wait_until(lambda: sum(r["reason"] == "overlap" for r in runs(router, sid)) >= 2, WAIT, what="fire times skipped")
    assert len(created(router, sid)) == 1
    skipped = [r for r in runs(router, sid) if r["reason"] == "overlap"]
    assert all(r["state"] == "skipped" and r["job_id"] == first["job_id"] for r in skipped)
    with router.client("alice-token") as http:
        assert http.delete(f"/v1/jobs/{first['job_id']}").status_code == 202
    second = wait_created(router, sid, 2)[1]
    assert ms(second["fire_at"]) > ms(skipped[-1]["fire_at"])
    status = settle(router, sid)
    assert status["skipped"] >= 2
    assert_each_fire_time_once(router, status)


def test_a_paused_schedule_does_not_fire(router: Cluster) -> None:
    paused = create(router, name="paused", paused=True, overlap="allow")
    assert paused["state"] == "paused" and paused["next_fire_at"] == []
    control = create(router, name="control", overlap="allow")["id"]
    wait_created(router, control, 2)
    status = get(router, paused["id"])
    assert status["fired"] == 0 and status["last_runs"] == []
    resumed = action(router, paused["id"], "resume")
    assert resumed["state"] == "active" and len(resumed["next_fire_at"]) == 5
    wait_created(router, paused["id"], 1)
    fired = action(router, paused["id"], "pause")["fired"]
    later = len(created(router, control)) + 2
    wait_created(router, control, later)
    again = get(router, paused["id"])
    assert again["fired"] == fired and again["state"] == "paused"
    settle(router, control)
    assert_each_fire_time_once(router, settle(router, paused["id"]))


def test_a_claim_whose_router_died_gets_one_job(redis_server: RedisServer, tmp_path: Path) -> None:
    """A claimed fire time with no job (its router died between claim and job) is finished by the
    next tick under the same idempotency key; submitting it again finds that job and makes none."""
    from edgefleet.router.services import RouterServices
    from edgefleet.schedule_schemas import ScheduleRequest

    settings = Settings(
        redis_url=redis_server.url,
        data_dir=tmp_path,
        tokens=TOKENS,  # type: ignore[arg-type]
        schedule_min_interval=1,
    )
    services = RouterServices.build(settings)  # in this process, no thread started: no other firer
    try:
        spec = ScheduleRequest.model_validate({"job": JOB, "interval_s": 1.0, "name": "half-done"})
        sid = asyncio.run(services.schedules.create(spec, "alice")).id
        store, firer = services.schedules.store, services.loops.schedules
        assert firer is not None
        current = store.get(sid)
        assert current is not None
        fire = current.next_at
        # What a router does just before it dies: the claim (the next fire time far away), and no job.
        assert store.claim_fire(sid, fire, fire, "", fire + 1000, fire + 10**9, 50).verdict == "fire"
        assert [r["state"] for r in store.runs(sid, 10)] == ["pending"]
        assert firer.tick() == 1
        first = store.runs(sid, 10)
        assert [r["state"] for r in first] == ["created"] and store.pending() == []
        assert firer.make_job(sid, fire) == 0  # its idempotency key finds the job
        assert store.runs(sid, 10) == first
        jobs = services.store.list_jobs(tenant="alice", state=None, limit=10, cursor=None).jobs
        assert [job.id for job in jobs] == [first[0]["job_id"]]
    finally:
        asyncio.run(services.close())


def test_racing_claims_of_one_fire_time(redis_server: RedisServer) -> None:
    """Many routers' connections claim the same fire time at once: exactly one wins."""
    from edgefleet.schedule_schemas import ScheduleRequest

    spec = ScheduleRequest.model_validate({"job": JOB, "interval_s": 1.0}).model_dump_json()
    stores = [ScheduleStore.of(JobStore.from_url(redis_server.url)) for _ in range(8)]
    assert stores[0].create("a" * 32, "alice", spec, 5000, 5000, False, 10) == "created"
    verdicts: list[str] = []
    barrier = threading.Barrier(len(stores))

    def claim(store: ScheduleStore) -> None:
        barrier.wait()
        for fire in range(5000, 25_000, 1000):
            verdicts.append(store.claim_fire("a" * 32, fire, fire, "", fire + 1000, fire + 1000, 100).verdict)

    threads = [threading.Thread(target=claim, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert verdicts.count("fire") == 20 and verdicts.count("moved") == 20 * 7
    assert sorted(p[1] for p in stores[0].pending()) == list(range(5000, 25_000, 1000))
    assert stores[0].create("b" * 32, "alice", spec, 5000, 5000, False, 1) == "full"


def _routers(redis_server: RedisServer, tmp_path: Path, *names: str) -> dict[str, Cluster]:
    for name in names:
        (tmp_path / name).mkdir()
    return {
        name: Cluster(redis=redis_server, workdir=tmp_path / name, env_overrides={**ENV, "EDGEFLEET_ROUTER_ID": name})
        for name in names
    }


def test_every_second_exactly_once_through_kills_with_two_routers(redis_server: RedisServer, tmp_path: Path) -> None:
    """Two routers; the leader is SIGKILLed (the other takes over), started again, and then the
    other one is SIGKILLed (the restarted one takes over): each fire time made one job."""
    routers = _routers(redis_server, tmp_path, "a", "b")
    leases = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        starting = [threading.Thread(target=cluster.start_router) for cluster in routers.values()]
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join()
        sid = create(routers["a"], name="every-second", overlap="allow", grace_s=120.0)["id"]
        seen = len(wait_created(routers["b"], sid, 3))
        first = wait_until(lambda: leases.get("ef:scheduler:leader"), WAIT, what="a leader")
        second = "b" if first == "a" else "a"
        routers[first].stop_router(signal.SIGKILL)
        seen = len(wait_created(routers[second], sid, seen + 3))
        routers[first].start_router()
        routers[second].stop_router(signal.SIGKILL)
        seen = len(wait_created(routers[first], sid, seen + 3))
        status = settle(routers[first], sid)
        covered = assert_each_fire_time_once(routers[first], status)
        # The routers were down for less than grace_s: every fire time made its job, none skipped.
        assert status["skipped"] == 0 and all(r["state"] == "created" for r in status["last_runs"])
        assert len(covered) >= seen >= 9
    finally:
        for cluster in routers.values():
            cluster.stop()


def test_missed_runs_after_downtime(router: Cluster) -> None:
    """grace_s 1: fire times the router reaches more than 1 s late were missed: `skip` makes no
    job for them, `run_once` one (the latest, reason catch_up). Last in the module: it stops the router."""
    skip = create(router, name="missed-skip", overlap="allow", grace_s=1.0, missed="skip")["id"]
    once = create(router, name="missed-once", overlap="allow", grace_s=1.0, missed="run_once")["id"]
    wait_created(router, skip, 2)
    wait_created(router, once, 2)
    router.stop_router(signal.SIGKILL)
    # Down long enough that several fire times are more than grace_s late (a restart takes seconds too).
    time.sleep(6)
    router.start_router()

    def long_gap(sid: str) -> bool:
        return any(r["reason"] == "missed" and r["count"] >= 3 for r in runs(router, sid))

    for sid in (skip, once):
        wait_until(lambda sid=sid: long_gap(sid), WAIT, what="the downtime recorded as missed")
        wait_created(router, sid, len(created(router, sid)) + 2)
    for sid, policy in ((skip, "skip"), (once, "run_once")):
        status = settle(router, sid)
        assert_each_fire_time_once(router, status)
        records = list(reversed(status["last_runs"]))
        missed = [i for i, r in enumerate(records) if r["reason"] == "missed"]
        assert all(records[i]["state"] == "skipped" for i in missed)
        catch_ups = [i for i, r in enumerate(records) if r["reason"] == "catch_up"]
        if policy == "skip":
            assert catch_ups == []
        else:
            # Each missed range is followed by the one run that stands for it (its latest fire time);
            # a single missed fire time is that run alone.
            assert catch_ups and all(records[i + 1]["reason"] == "catch_up" for i in missed)
            assert all(records[i]["state"] == "created" for i in catch_ups)
