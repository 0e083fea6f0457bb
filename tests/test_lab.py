"""Many boxes, tested as separate hosts: a hub and two worker boxes in network namespaces.

See tests/netlab.py for the lab. box1 and box2 get the broker's address and password and nothing
else of the hub; box3 and box4 join with `edgefleet worker --join` and a join token. Each box
reaches the hub only over its own veth link and sees only its own data folder, so a step that
reads a file another box wrote gets it only if the file moved as an artifact.

The witness of who ran what is the `stamp` plugin (tests/lab_plugins/stamp): each run appends
"start", a "tick" every 50 ms and "end", with the wall-clock time, to a file in the folder the
operator granted it, which on each box is that box's own folder. The boxes share the machine's
clock (namespaces do not virtualise CLOCK_REALTIME), so their records can be compared line by
line; on real hosts that would need synchronised clocks, which is why the product itself never
relies on it (leases are timed by the worker's monotonic clock and Redis' TIME).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_until
from tests.netlab import REDIS_PORT, Lab, lab_unavailable, new_lab

pytestmark = [pytest.mark.netns, pytest.mark.cluster]

BOXES = ("box1", "box2")  # started with the broker URL only
JOINED = ("box3", "box4")  # joined with a token
READER_TOKEN = "reader-token"  # tests/conftest.py TOKENS: read scope, for Prometheus' discovery


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    why = lab_unavailable()
    if why:
        pytest.skip(why)
    made = new_lab(logs_to=tmp_path_factory.mktemp("lab-logs"))
    try:
        made.build(*BOXES, *JOINED)
        made.start_hub()
        for name in BOXES:
            made.start_box(name)
        made.wait_boxes_ready(*BOXES)
        yield made
    finally:
        made.close()


def stamp_step(marker: Path, seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "id": "stamp",
        "plugin": "stamp",
        "action": "run",
        "args": {"seconds": seconds, "interval": 0.05, "marker": str(marker)},
        "timeout": 120,
        **extra,
    }


def records(path: Path) -> list[tuple[str, int, float]]:
    """(event, attempt, unix time) per line of a stamp record; none if the box never ran it."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        event, _subtask, attempt, at = line.split()
        rows.append((event, int(attempt), float(at)))
    return rows


def run_pinned(lab: Lab, box: str) -> dict[str, Any]:
    """A short job that may run only on `box`; its status once finished."""
    marker = lab.marks_dir() / f"{uuid.uuid4().hex}.log"
    job = lab.submit({"steps": [stamp_step(marker, 0, node=box)]})
    return lab.wait_job(job["id"], timeout=60)


def test_a_box_given_only_the_broker_takes_work(lab: Lab) -> None:
    for box in BOXES:
        # Nothing to fall back on inside a box: no Redis on its loopback.
        assert ":6379" not in lab.listening_in(box)
        # The password reached the node through its environment, not its command line.
        proc = lab.boxes[box].proc
        assert proc is not None
        assert lab.password not in Path(f"/proc/{proc.pid}/cmdline").read_text()

        marker = lab.marks_dir() / f"{uuid.uuid4().hex}.log"
        job = lab.submit({"steps": [stamp_step(marker, 0, node=box)]})
        status = lab.wait_job(job["id"], timeout=60)
        assert status["state"] == "succeeded", status
        assert status["subtasks"][0]["node"] == box
        # One path for the plugin, a different folder on each box: the record is only in this box's.
        ran_here = records(lab.marks_dir(box) / marker.name)
        assert [event for event, _, _ in ran_here] == ["start", "end"]
        for other in BOXES:
            if other != box:
                assert records(lab.marks_dir(other) / marker.name) == []


@pytest.mark.parametrize("cut", ["unplugged", "silent"])
def test_a_cut_off_box_stops_its_copy_before_another_box_takes_the_step_over(
    lab: Lab, cut: str, record_property: Any
) -> None:
    """`unplugged`: the box's cable is pulled at the hub (its NIC loses carrier). `silent`: the
    switch port stops forwarding, both ends keep carrier (a cut further away): the box hears
    nothing at all, the harder case for noticing the link is dead and that it is back."""
    marker = lab.marks_dir() / f"{uuid.uuid4().hex}.log"
    job = lab.submit({"steps": [stamp_step(marker, 8)]})

    def running_on() -> str | None:
        subtask = lab.job(job["id"])["subtasks"][0]
        node = subtask["node"] if subtask["state"] == "running" else None
        # Running for the store, and ticking for the plugin's own record.
        return node if node and any(e == "tick" for e, _, _ in records(lab.marks_dir(node) / marker.name)) else None

    first = wait_until(running_on, 60, interval=0.1, what="the step running on a box")
    other = next(box for box in BOXES if box != first)
    processes = lab.process_tree(first)

    lab.cut(first, silent=cut == "silent")
    status = lab.wait_job(job["id"], timeout=90)

    assert status["state"] == "succeeded", status
    assert status["subtasks"][0]["node"] == other
    cut_off = records(lab.marks_dir(first) / marker.name)
    took_over = records(lab.marks_dir(other) / marker.name)
    assert cut_off[0][0] == "start" and "end" not in {e for e, _, _ in cut_off}, "the cut-off copy was not stopped"
    assert took_over[0][0] == "start" and took_over[-1][0] == "end"
    # No overlap: the cut-off box's last record comes before the other box's first.
    last_cut_off, first_other = cut_off[-1][2], took_over[0][2]
    assert last_cut_off < first_other, f"both boxes ran the step at once: {cut_off[-3:]} / {took_over[:3]}"
    record_property("fence_gap_s", round(first_other - last_cut_off, 2))

    # The cable comes back: the same processes serve again, without a restart.
    lab.mend(first)
    mended = time.monotonic()
    client = lab.redis()
    wait_until(lambda: client.exists(f"ef:node:{first}"), 60, interval=0.1, what=f"{first}'s heartbeat")
    live_after = time.monotonic() - mended
    served = run_pinned(lab, first)
    served_after = time.monotonic() - mended
    assert served["state"] == "succeeded", served
    assert served["subtasks"][0]["node"] == first
    assert lab.process_tree(first) == processes
    record_property("heartbeat_back_s", round(live_after, 2))
    record_property("serving_again_s", round(served_after, 2))
    print(
        f"\n{cut}: no overlap (the other box started {first_other - last_cut_off:.2f} s after the cut-off box's"
        f" last record); link back: heartbeat after {live_after:.2f} s, a pinned job done after {served_after:.2f} s"
    )


# --- boxes that join with a token ----------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(lab: Lab) -> Iterator[str]:
    """A real Prometheus in the hub, started before any box joins; then box3 and box4 join."""
    url = lab.start_prometheus(READER_TOKEN)
    with lab.http() as http:
        for name in JOINED:
            made = http.post("/v1/join-tokens", json={"name": name})
            assert made.status_code == 201, made.text
            lab.join_box(name, made.json()["token"])
    lab.wait_boxes_ready(*JOINED)
    yield url


def two_step(text: str, producer: str, consumer: str) -> dict[str, Any]:
    """`write` saves a file in its workspace on `producer`; `count` reads it on `consumer`."""
    return {
        "steps": [
            {
                "id": "write",
                "plugin": "text",
                "action": "transform",
                "node": producer,
                "args": {"text": text, "op": "upper", "save_as": "out.txt"},
            },
            {
                "id": "count",
                "plugin": "text",
                "action": "count",
                "node": consumer,
                "args": {"path": {"$ref": "steps.write.output.path"}},
            },
        ]
    }


def node_downloads(lab: Lab) -> float:
    """Artifacts the router served to nodes (edgefleet_artifact_downloads_total{by="node"})."""
    with lab.http() as http:
        text = http.get("/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "edgefleet_artifact_downloads":
            return sum(s.value for s in family.samples if s.name.endswith("_total") and s.labels.get("by") == "node")
    return 0.0


def test_joined_boxes_pass_files_through_artifacts_and_a_warm_box_fetches_nothing(lab: Lab, prometheus: str) -> None:
    producer, consumer = JOINED
    text = "the fox and the dog and the end"
    downloads = node_downloads(lab)
    done = lab.wait_job(lab.submit(two_step(text, producer, consumer))["id"])
    assert done["state"] == "succeeded", done
    by_id = {st["id"]: st for st in done["subtasks"]}
    assert by_id["write"]["node"] == producer and by_id["count"]["node"] == consumer
    assert by_id["count"]["output"]["words"] == 8

    # The producer's path is the same path on every box, but only the producer's folder has the
    # file: the consumer read its own hash-checked copy, fetched from the router.
    [artifact] = done["artifacts"]
    relative = Path(artifact["path"]).relative_to(lab.box_root)
    assert (lab.private / producer / relative).read_bytes() == text.upper().encode()
    assert not (lab.private / consumer / relative).exists()
    cached = lab.private / consumer / "data" / "workspaces" / ".artifacts" / artifact["id"]
    assert cached.read_bytes() == text.upper().encode()
    assert node_downloads(lab) == downloads + 1
    fetched = lab.log_tail(f"node-{consumer}", 10**7).count('"artifact fetched"')
    assert fetched == 1

    # The same job again: the consumer's box holds the file already and fetches nothing.
    again = lab.wait_job(lab.submit(two_step(text, producer, consumer))["id"])
    assert again["state"] == "succeeded", again
    assert again["artifacts"][0]["id"] == artifact["id"]
    assert node_downloads(lab) == downloads + 1
    assert lab.log_tail(f"node-{consumer}", 10**7).count('"artifact fetched"') == fetched


def test_boxes_given_only_the_broker_find_the_router_for_artifacts(lab: Lab) -> None:
    # Neither box was told the router's URL: each uploads to and fetches from the address the
    # router published in the job store (its broker's host, the router's port), not 127.0.0.1.
    producer, consumer = BOXES
    text = "one box writes and the other reads"
    done = lab.wait_job(lab.submit(two_step(text, producer, consumer))["id"])
    assert done["state"] == "succeeded", done
    by_id = {st["id"]: st for st in done["subtasks"]}
    assert by_id["write"]["node"] == producer and by_id["count"]["node"] == consumer
    assert by_id["count"]["output"]["words"] == 7
    [artifact] = done["artifacts"]
    cached = lab.private / consumer / "data" / "workspaces" / ".artifacts" / artifact["id"]
    assert cached.read_bytes() == text.upper().encode()


def prometheus_targets(prometheus: str) -> dict[str, dict[str, Any]]:
    """Prometheus' active targets of the workers job, by node label."""
    try:
        answer = httpx.get(f"{prometheus}/api/v1/targets", timeout=5, trust_env=False).json()
    except (httpx.HTTPError, ValueError):
        return {}
    active = answer.get("data", {}).get("activeTargets", [])
    return {t["labels"]["node"]: t for t in active if t["labels"].get("job") == "edgefleet-workers"}


def test_prometheus_in_the_hub_scrapes_the_boxes_that_joined_after_it_started(lab: Lab, prometheus: str) -> None:
    def scraped() -> dict[str, dict[str, Any]] | None:
        targets = prometheus_targets(prometheus)
        return targets if all(targets.get(name, {}).get("health") == "up" for name in JOINED) else None

    try:
        targets = wait_until(scraped, 60, interval=0.5, what="Prometheus scraping the joined boxes")
    except AssertionError:
        raise AssertionError(f"{prometheus_targets(prometheus)}\n{lab.log_tail('prometheus')}") from None
    with lab.http() as http:
        advertised = {n["name"]: n["metrics_url"] for n in http.get("/v1/workers").json()}
    for name in JOINED:
        # Each box is scraped at its own address on the LAN, the one it advertises.
        assert targets[name]["scrapeUrl"] == advertised[name]
        assert urlsplit(advertised[name]).hostname == lab.boxes[name].link.far_address


def test_a_revoked_box_is_refused_and_the_others_go_on(lab: Lab, prometheus: str) -> None:
    revoked, other = JOINED[1], JOINED[0]
    kept = (lab.private / revoked / "data" / "node.env").read_text().splitlines()
    broker = urlsplit(dict(line.split("=", 1) for line in kept if "=" in line)["EDGEFLEET_REDIS_URL"])
    node_pids = lab.process_tree(revoked)

    with lab.http() as http:
        answer = http.delete(f"/v1/join-tokens/{revoked}")
        assert answer.status_code == 200, answer.text
        assert revoked not in [n["name"] for n in http.get("/v1/workers").json()]
        # Its credentials open nothing any more.
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(
                host=lab.hub_address, port=REDIS_PORT, username=broker.username, password=broker.password
            ).ping()
        # Several heartbeat intervals later it is still out: work pinned to it is refused.
        time.sleep(2)
        assert revoked not in [n["name"] for n in http.get("/v1/workers").json()]
        marker = lab.marks_dir() / f"{uuid.uuid4().hex}.log"
        pinned = http.post("/v1/jobs", json={"steps": [stamp_step(marker, 0, node=revoked)]})
        assert pinned.status_code == 422, pinned.text
        assert pinned.json()["detail"][0]["field"] == "steps.0.node"
    # Shut out, not crashed: the same processes run on.
    assert lab.process_tree(revoked) == node_pids

    # The other joined box still works (its artifact credential is made again: revoking rotated
    # the secret it was derived from).
    done = lab.wait_job(lab.submit(two_step("still here", other, other))["id"])
    assert done["state"] == "succeeded", done
