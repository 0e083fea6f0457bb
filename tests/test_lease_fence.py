"""The lease fence (workers/lease_fence.py): a box gives up a lease it cannot renew before the
store may hand the subtask to another box. The whole path across hosts is tests/test_lab.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from edgefleet.store.attempts import LEASE_GRACE
from edgefleet.workers.lease_fence import LeaseFence, LeaseTiming
from tests.conftest import wait_until


@pytest.mark.parametrize("ttl", [1.0, 3.0, 10.0, 30.0, 300.0])
def test_the_fence_gives_up_before_the_store_may_reassign(ttl: float) -> None:
    timing = LeaseTiming.of(ttl)
    # The store reassigns no earlier than TTL + grace after the last acknowledged renewal was
    # sent; the fence gives up earlier by two renew intervals plus the grace: room to kill.
    assert 0 < timing.give_up_after < ttl
    assert ttl + LEASE_GRACE - timing.give_up_after == pytest.approx(2 * timing.renew_interval + LEASE_GRACE)
    # ...and at least two renewals can fail before it gives up, so one lost reply costs nothing.
    assert timing.give_up_after >= 3 * timing.renew_interval


def test_a_renewed_lease_is_kept_and_an_unrenewed_one_kills_the_process_group() -> None:
    plugin = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    killed = threading.Event()

    def kill() -> None:
        os.killpg(plugin.pid, signal.SIGKILL)
        plugin.wait()
        killed.set()

    timing = LeaseTiming(ttl=0.9, renew_interval=0.1, give_up_after=0.3)
    fence = LeaseFence(timing, time.monotonic(), kill)
    try:
        # Renewed well within the give-up time, for several give-up times: the plugin lives.
        for _ in range(12):
            time.sleep(0.1)
            fence.renewed(time.monotonic())
        assert not fence.fired and plugin.poll() is None
        # No renewal acknowledged any more (a dead link): the fence kills on its own thread.
        last_renewal = time.monotonic()
        fence.renewed(last_renewal)
        wait_until(killed.is_set, 30, what="the fence to kill the plugin")
        assert fence.fired_at is not None and fence.fired_at >= last_renewal + timing.give_up_after
        assert plugin.returncode == -signal.SIGKILL
    finally:
        fence.close()
        if plugin.poll() is None:
            plugin.kill()
            plugin.wait()


def test_a_closed_fence_never_fires() -> None:
    fired = threading.Event()
    fence = LeaseFence(LeaseTiming(ttl=0.6, renew_interval=0.1, give_up_after=0.2), time.monotonic(), fired.set)
    fence.close()
    time.sleep(0.4)
    assert not fired.is_set() and not fence.fired


def test_an_armed_fence_counts_its_deadline_from_the_claim_not_from_arming() -> None:
    fired = threading.Event()
    leased_at = time.monotonic()
    timing = LeaseTiming(ttl=0.6, renew_interval=0.1, give_up_after=0.2)
    fence = LeaseFence(timing, leased_at, fired.set, armed=False)
    try:
        time.sleep(0.4)  # past the deadline, but not watching yet: a subtask that ended in time
        assert not fired.is_set() and not fence.fired
        fence.arm()
        wait_until(fired.is_set, 30, what="the armed fence to fire")
        assert fence.fired_at is not None and fence.fired_at >= leased_at + timing.give_up_after
        fence.arm()  # once only
    finally:
        fence.close()


def test_an_unarmed_fence_closes_without_a_thread() -> None:
    fence = LeaseFence(
        LeaseTiming(ttl=0.6, renew_interval=0.1, give_up_after=0.2), time.monotonic(), lambda: None, armed=False
    )
    fence.close()
    fence.arm()  # closed: stays unarmed
    assert not fence.fired
