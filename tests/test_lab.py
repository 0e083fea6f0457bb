"""Many boxes, tested as separate hosts: a hub and two worker boxes in network namespaces.

See tests/netlab.py for the lab. The boxes get the broker's address and password and nothing
else of the hub; each reaches it only over its own veth link and sees only its own data folder.

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

import pytest

from tests.conftest import wait_until
from tests.netlab import Lab, lab_unavailable, new_lab

pytestmark = [pytest.mark.netns, pytest.mark.cluster]

BOXES = ("box1", "box2")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    why = lab_unavailable()
    if why:
        pytest.skip(why)
    made = new_lab(logs_to=tmp_path_factory.mktemp("lab-logs"))
    try:
        made.build(*BOXES)
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
