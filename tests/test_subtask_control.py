"""A sandboxed subtask reads the worker's cancels and model replies when the plugin asks
(workers/sandbox_launcher.SubtaskControl): no thread reads the pipe for it."""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from edgefleet.workers.sandbox_launcher import SubtaskControl, _Channel, _Lines


class Pipe:
    """The worker's end of a subtask's control pipe, and what the subtask sent back."""

    def __init__(self) -> None:
        self.read, self.write = os.pipe()
        self.sent = io.StringIO()
        self.control = SubtaskControl(_Channel(self.sent), _Lines(self.read))

    def tell(self, message: dict[str, Any]) -> None:
        os.write(self.write, (json.dumps(message) + "\n").encode())

    def calls(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.sent.getvalue().splitlines()]

    def close(self) -> None:
        for fd in (self.read, self.write):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture()
def pipe() -> Iterator[Pipe]:
    made = Pipe()
    yield made
    made.close()


def test_a_cancel_is_seen_when_the_plugin_asks(pipe: Pipe) -> None:
    assert not pipe.control.is_cancelled()
    pipe.tell({"type": "cancel"})
    assert pipe.control.is_cancelled()


def test_concurrent_model_calls_each_get_their_own_reply(pipe: Pipe) -> None:
    replies: dict[str, dict[str, Any]] = {}

    def call(name: str) -> None:
        replies[name] = pipe.control.models.call({"task_type": name})

    threads = [threading.Thread(target=call, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    while len(pipe.calls()) < 2:
        threading.Event().wait(0.01)
    for sent in reversed(pipe.calls()):  # answered in the other order
        pipe.tell({"type": "model_reply", "id": sent["id"], "ok": True, "text": sent["task_type"]})
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "a model call still waits for its reply"
    assert replies == {
        "first": {"type": "model_reply", "id": replies["first"]["id"], "ok": True, "text": "first"},
        "second": {"type": "model_reply", "id": replies["second"]["id"], "ok": True, "text": "second"},
    }


def test_the_worker_gone_cancels_and_ends_a_waiting_model_call(pipe: Pipe) -> None:
    result: list[dict[str, Any]] = []
    waiting = threading.Thread(target=lambda: result.append(pipe.control.models.call({"task_type": "x"})))
    waiting.start()
    while not pipe.calls():
        threading.Event().wait(0.01)
    os.close(pipe.write)
    waiting.join(30)
    assert not waiting.is_alive()
    assert result[0]["ok"] is False
    assert pipe.control.is_cancelled()


def test_after_close_the_stream_is_left_to_the_executor(pipe: Pipe) -> None:
    """A shared executor reads its next `run` from the same stream: a thread the subtask left
    behind must not take it."""
    pipe.control.close()
    pipe.tell({"type": "run", "id": "next"})
    assert not pipe.control.is_cancelled()
    assert _Lines(pipe.read).next() == json.dumps({"type": "run", "id": "next"}) + "\n"
