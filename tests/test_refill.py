"""The worker's fast-path release thread: requests return at once, and requests that arrive while a
release runs are merged into one release per class."""

from __future__ import annotations

import threading
from typing import Any, cast

from edgefleet.scheduling.dispatch import Dispatcher
from edgefleet.schemas import ResourceClass
from edgefleet.workers.refill import Refiller


class RecordingDispatcher:
    """Records release calls; the first one blocks until `go` is set, like a slow Redis."""

    def __init__(self) -> None:
        self.calls: list[tuple[ResourceClass, str | None]] = []
        self.entered = threading.Event()
        self.go = threading.Event()
        self.fail_on: ResourceClass | None = None

    def release(self, resource_class: ResourceClass, max_count: int = 256, freed_on: str | None = None) -> int:
        self.calls.append((resource_class, freed_on))
        self.entered.set()
        self.go.wait(30)
        if resource_class is self.fail_on:
            raise ConnectionError("redis went away")
        return 1


def refiller(dispatcher: RecordingDispatcher) -> Refiller:
    return Refiller(cast(Dispatcher, cast(Any, dispatcher)), "box-a")


def test_requests_during_a_release_are_merged_into_one_per_class() -> None:
    dispatcher = RecordingDispatcher()
    refill = refiller(dispatcher)
    refill.request([ResourceClass.cpu])  # returns while the release blocks
    assert dispatcher.entered.wait(30)
    for _ in range(5):  # five more subtasks end meanwhile
        refill.request([ResourceClass.cpu])
    refill.request([ResourceClass.io, ResourceClass.cpu])
    dispatcher.go.set()
    assert refill.wait_idle(30)
    assert dispatcher.calls == [
        (ResourceClass.cpu, "box-a"),
        (ResourceClass.cpu, "box-a"),
        (ResourceClass.io, "box-a"),
    ]


def test_a_failed_release_is_logged_and_the_thread_serves_the_next_request() -> None:
    dispatcher = RecordingDispatcher()
    dispatcher.go.set()
    dispatcher.fail_on = ResourceClass.cpu
    refill = refiller(dispatcher)
    refill.request([ResourceClass.cpu, ResourceClass.gpu])
    assert refill.wait_idle(30)
    refill.request([ResourceClass.io])
    assert refill.wait_idle(30)
    assert [rc for rc, _ in dispatcher.calls] == [ResourceClass.cpu, ResourceClass.gpu, ResourceClass.io]


def test_nothing_to_release_starts_no_thread() -> None:
    refill = refiller(RecordingDispatcher())
    refill.request([])
    assert refill._thread is None and refill.wait_idle(1)
