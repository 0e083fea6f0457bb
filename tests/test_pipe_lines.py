"""workers/pipe_lines.py: the protocol pipe read on the waiting thread, over a real pipe."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from edgefleet.workers.pipe_lines import EOF, OVERSIZED, PipeLines


@pytest.fixture
def pipe() -> Iterator[tuple[PipeLines, int]]:
    read_fd, write_fd = os.pipe()
    yield PipeLines(read_fd, limit=64), write_fd
    for fd in (read_fd, write_fd):
        try:
            os.close(fd)
        except OSError:
            pass


def test_lines_come_whole_however_the_bytes_arrive(pipe: tuple[PipeLines, int]) -> None:
    lines, w = pipe
    os.write(w, b'{"a": 1}\n{"b"')
    assert lines.next(5) == '{"a": 1}\n'
    assert lines.next(0) is None  # half a line: nothing yet
    os.write(w, b': "\xc3\xa9"}\n')
    assert lines.next(5) == '{"b": "\u00e9"}\n'


def test_nothing_within_the_timeout_is_none_and_a_late_line_still_comes(pipe: tuple[PipeLines, int]) -> None:
    lines, w = pipe
    assert lines.next(0.05) is None
    writer = threading.Timer(0.1, lambda: os.write(w, b"late\n"))
    writer.start()
    assert lines.next(30) == "late\n"
    writer.join()


def test_the_end_of_the_pipe_after_a_last_unfinished_line(pipe: tuple[PipeLines, int]) -> None:
    lines, w = pipe
    os.write(w, b"one\ntail")
    os.close(w)
    assert lines.next(5) == "one\n"
    assert lines.next(5) == "tail"
    assert lines.next(5) is EOF
    assert lines.next(5) is EOF


@pytest.mark.parametrize("payload", [b"x" * 65 + b"\n", b"y" * 200])
def test_a_line_over_the_limit_is_reported_not_buffered_on(pipe: tuple[PipeLines, int], payload: bytes) -> None:
    lines, w = pipe
    os.write(w, payload)
    assert lines.next(5) is OVERSIZED


def test_a_line_at_the_limit_is_fine(pipe: tuple[PipeLines, int]) -> None:
    lines, w = pipe
    os.write(w, b"z" * 64 + b"\n")
    assert lines.next(5) == "z" * 64 + "\n"
