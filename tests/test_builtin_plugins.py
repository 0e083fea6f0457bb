"""The built-in plugins, called directly with a real PluginContext (no worker, no mocks)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from edgefleet.plugin_catalog import PluginCatalog, builtin_plugin_dir
from edgefleet.plugin_context import PathOutsideWorkspace, PluginContext, SubtaskCancelled
from tests.conftest import serving

HELLO = "Hello world.\nhello EDGE, hello fleet!\n"


# /slow sends its body in SLOW_CHUNKS pieces of 1 KiB, SLOW_CHUNK_PAUSE apart: 400 s in all, longer
# than the test timeout, so a fetch that a cancel or its own timeout did not stop fails its test.
SLOW_CHUNKS = 20_000
SLOW_CHUNK_PAUSE = 0.02


@pytest.fixture(scope="module")
def catalog() -> PluginCatalog:
    loaded = PluginCatalog.load([builtin_plugin_dir()])
    assert loaded.errors == []
    return loaded


def plugin_fn(catalog: PluginCatalog, name: str) -> Callable[[PluginContext, str, dict[str, Any]], dict[str, Any]]:
    plugin = catalog.get(name)
    assert plugin is not None
    return plugin.load_callable()


class Recorder:
    """Collects progress reports and carries a cancel flag that tests can raise."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.progress: list[tuple[float, str]] = []

    def report(self, fraction: float, message: str) -> None:
        self.progress.append((fraction, message))


@pytest.fixture()
def rec() -> Recorder:
    return Recorder()


def make_ctx(workspace: Path, rec: Recorder, *, attempt: int = 1, timeout: float = 60.0) -> PluginContext:
    workspace.mkdir(parents=True, exist_ok=True)
    return PluginContext(
        job_id="job-1",
        subtask_id="step-1",
        attempt=attempt,
        workspace=workspace,
        deadline=time.monotonic() + timeout,
        is_cancelled=rec.cancel.is_set,
        report_progress=rec.report,
    )


@pytest.fixture()
def ctx(tmp_path: Path, rec: Recorder) -> PluginContext:
    return make_ctx(tmp_path / "ws", rec)


# --- a real HTTP server ----------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        return None

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on purpose (cancel, max_bytes)

    def _route(self) -> None:
        if self.path == "/docs/hello.txt":
            self._send(200, HELLO.encode())
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/docs/hello.txt")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/missing":
            self._send(404, b"no such thing")
        elif self.path == "/big":
            self._send(200, b"x" * 200_000, "application/octet-stream")
        elif self.path == "/unsized":
            # No Content-Length: the body ends when the connection closes.
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b"y" * 10_000)
            self.close_connection = True
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(SLOW_CHUNKS * 1024))
            self.end_headers()
            for _ in range(SLOW_CHUNKS):
                self.wfile.write(b"z" * 1024)
                self.wfile.flush()
                time.sleep(SLOW_CHUNK_PAUSE)
        else:
            self._send(404, b"unknown path")


@pytest.fixture(scope="module")
def http_base() -> Iterator[str]:
    with serving(Handler) as url:
        yield url


# --- PluginContext ---------------------------------------------------------------------------


def test_context_basics(tmp_path: Path, rec: Recorder) -> None:
    ctx = make_ctx(tmp_path, rec, attempt=3, timeout=30)
    assert (ctx.job_id, ctx.subtask_id, ctx.attempt, ctx.workspace) == ("job-1", "step-1", 3, tmp_path)
    assert 29 < ctx.time_left() <= 30
    assert not ctx.cancelled
    ctx.progress(1.7, "over")
    ctx.progress(-2)
    ctx.progress(float("nan"), "nan")
    assert rec.progress == [(1.0, "over"), (0.0, ""), (0.0, "nan")]
    assert ctx.workspace_path("a/b.txt") == tmp_path.resolve() / "a" / "b.txt"
    for bad in ("../escape.txt", "/etc/passwd", "a/../../x", ""):
        with pytest.raises(PathOutsideWorkspace):
            ctx.workspace_path(bad)
    assert ctx.input_path("in.txt") == tmp_path / "in.txt"
    assert ctx.input_path("/abs/file") == Path("/abs/file")
    assert ctx.sleep(0.05) is True
    ctx.check_cancelled()
    rec.cancel.set()
    assert ctx.cancelled
    assert ctx.sleep(5) is False
    with pytest.raises(SubtaskCancelled) as info:
        ctx.check_cancelled()
    assert not info.value.timed_out


def test_context_deadline_counts_as_cancelled(tmp_path: Path, rec: Recorder) -> None:
    ctx = make_ctx(tmp_path, rec, timeout=0.2)
    # Woken by the deadline: an hour's sleep that ran its course would fail the test on its timeout.
    assert ctx.sleep(3600) is False
    assert ctx.cancelled and ctx.time_left() == 0
    with pytest.raises(SubtaskCancelled) as info:
        ctx.check_cancelled()
    assert info.value.timed_out


# --- text ------------------------------------------------------------------------------------


def test_text_count_inline(catalog: PluginCatalog, ctx: PluginContext, rec: Recorder) -> None:
    out = plugin_fn(catalog, "text")(ctx, "count", {"text": HELLO})
    assert out == {
        "words": 6,
        "lines": 2,
        "chars": len(HELLO),
        "top": [["hello", 3], ["edge", 1], ["fleet", 1], ["world", 1]],
    }
    assert rec.progress[-1][0] == 1.0


def test_text_count_file_relative_and_absolute(catalog: PluginCatalog, ctx: PluginContext, tmp_path: Path) -> None:
    text = "".join(f"line {i} don't stop\n" for i in range(5000)) + "no newline at end"
    (ctx.workspace / "in.txt").write_text(text, encoding="utf-8")
    count = plugin_fn(catalog, "text")
    relative = count(ctx, "count", {"path": "in.txt"})
    absolute = count(ctx, "count", {"path": str(ctx.workspace / "in.txt")})
    assert relative == absolute
    assert relative["lines"] == 5001
    assert relative["chars"] == len(text)
    assert relative["words"] == 5000 * 4 + 4
    assert relative["top"][:3] == [["don't", 5000], ["line", 5000], ["stop", 5000]]
    assert len(relative["top"]) == 10
    assert count(ctx, "count", {"text": ""}) == {"words": 0, "lines": 0, "chars": 0, "top": []}


def test_text_count_errors(catalog: PluginCatalog, ctx: PluginContext) -> None:
    count = plugin_fn(catalog, "text")
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        count(ctx, "count", {"path": "nope.txt"})
    with pytest.raises(ValueError, match="exactly one"):
        count(ctx, "count", {"text": "a", "path": "b"})
    with pytest.raises(ValueError, match="no action 'explode'"):
        count(ctx, "explode", {})


@pytest.mark.parametrize(
    ("op", "source", "expected"),
    [
        ("upper", "Hello World", "HELLO WORLD"),
        ("lower", "Hello World", "hello world"),
        ("title", "don't stop me now", "Don't Stop Me Now"),
        ("reverse_words", "one two three\nfour five", "three two one\nfive four"),
        (
            "strip_html",
            "<html><head><style>p{}</style><script>alert(1)</script></head>"
            "<body><h1>Title</h1><p>Fish &amp; chips,   <b>hot</b></p></body></html>",
            "Title\n\nFish & chips, hot",
        ),
    ],
)
def test_text_transform_ops(catalog: PluginCatalog, ctx: PluginContext, op: str, source: str, expected: str) -> None:
    out = plugin_fn(catalog, "text")(ctx, "transform", {"text": source, "op": op})
    assert out == {"text": expected, "chars": len(expected), "path": None, "truncated": False}


def test_text_transform_file_save_and_truncate(catalog: PluginCatalog, ctx: PluginContext) -> None:
    big = "abc " * 5000  # 20000 chars
    (ctx.workspace / "big.txt").write_text(big, encoding="utf-8")
    transform = plugin_fn(catalog, "text")
    out = transform(ctx, "transform", {"path": "big.txt", "op": "upper", "save_as": "out/BIG.txt"})
    assert out["chars"] == 20000 and out["truncated"] is True
    assert out["text"] == ("ABC " * 5000)[:10_000]
    saved = Path(out["path"])
    assert saved == ctx.workspace.resolve() / "out" / "BIG.txt"
    assert saved.read_text(encoding="utf-8") == "ABC " * 5000
    assert not list(saved.parent.glob(".*.part"))
    with pytest.raises(PathOutsideWorkspace):
        transform(ctx, "transform", {"text": "x", "op": "upper", "save_as": "../escape.txt"})
    with pytest.raises(ValueError, match="'op' must be one of"):
        transform(ctx, "transform", {"text": "x", "op": "shout"})


# --- http_fetch ------------------------------------------------------------------------------


def test_fetch_saves_body(catalog: PluginCatalog, ctx: PluginContext, http_base: str) -> None:
    fetch = plugin_fn(catalog, "http_fetch")
    out = fetch(ctx, "get", {"url": f"{http_base}/docs/hello.txt"})
    assert out["status"] == 200
    assert out["bytes"] == len(HELLO.encode())
    assert out["content_type"].startswith("text/plain")
    path = Path(out["path"])
    assert path.is_absolute() and path == ctx.workspace.resolve() / "hello.txt"
    assert path.read_text(encoding="utf-8") == HELLO

    # The fetched file feeds text.count by path, as in the fetch-and-count template.
    counted = plugin_fn(catalog, "text")(ctx, "count", {"path": out["path"]})
    assert counted["words"] == 6


def test_fetch_follows_redirects_and_names_file(catalog: PluginCatalog, ctx: PluginContext, http_base: str) -> None:
    out = plugin_fn(catalog, "http_fetch")(ctx, "get", {"url": f"{http_base}/redirect", "filename": "sub/page.txt"})
    assert out["status"] == 200
    assert out["url"].endswith("/docs/hello.txt")
    assert Path(out["path"]) == ctx.workspace.resolve() / "sub" / "page.txt"
    assert Path(out["path"]).read_text(encoding="utf-8") == HELLO


def test_fetch_http_error_status(catalog: PluginCatalog, ctx: PluginContext, http_base: str) -> None:
    with pytest.raises(RuntimeError, match="answered HTTP 404"):
        plugin_fn(catalog, "http_fetch")(ctx, "get", {"url": f"{http_base}/missing", "filename": "m.txt"})
    assert list(ctx.workspace.iterdir()) == []


@pytest.mark.parametrize("path", ["/big", "/unsized"])
def test_fetch_max_bytes(catalog: PluginCatalog, ctx: PluginContext, http_base: str, path: str) -> None:
    with pytest.raises(RuntimeError, match="exceeds max_bytes=1000"):
        plugin_fn(catalog, "http_fetch")(ctx, "get", {"url": f"{http_base}{path}", "max_bytes": 1000})
    assert list(ctx.workspace.iterdir()) == []  # no partial file left behind


def test_fetch_big_within_limit(catalog: PluginCatalog, ctx: PluginContext, http_base: str, rec: Recorder) -> None:
    out = plugin_fn(catalog, "http_fetch")(ctx, "get", {"url": f"{http_base}/big"})
    assert out["bytes"] == 200_000 and os.path.getsize(out["path"]) == 200_000
    assert out["content_type"] == "application/octet-stream"
    assert rec.progress[-1][0] == 1.0


def test_fetch_cancel_and_timeout(catalog: PluginCatalog, ctx: PluginContext, http_base: str, rec: Recorder) -> None:
    fetch = plugin_fn(catalog, "http_fetch")
    threading.Timer(0.3, rec.cancel.set).start()
    # Stopped by the cancel (the slow body outlasts the test's timeout).
    with pytest.raises(SubtaskCancelled):
        fetch(ctx, "get", {"url": f"{http_base}/slow"})
    assert list(ctx.workspace.iterdir()) == []

    rec.cancel.clear()
    with pytest.raises(RuntimeError, match="timed out"):
        fetch(ctx, "get", {"url": f"{http_base}/slow", "timeout": 0.4})
    assert list(ctx.workspace.iterdir()) == []


def test_fetch_rejects_other_schemes(catalog: PluginCatalog, ctx: PluginContext) -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        plugin_fn(catalog, "http_fetch")(ctx, "get", {"url": "file:///etc/passwd"})


def test_fetch_connection_refused(catalog: PluginCatalog, ctx: PluginContext) -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeError, match="failed: ConnectError"):
        plugin_fn(catalog, "http_fetch")(ctx, "get", {"url": f"http://127.0.0.1:{port}/x", "timeout": 5})


# --- sleep -----------------------------------------------------------------------------------


def test_sleep_sleeps_and_marks(catalog: PluginCatalog, ctx: PluginContext, tmp_path: Path) -> None:
    marker = tmp_path / "marker.log"
    started = time.monotonic()
    out = plugin_fn(catalog, "sleep")(ctx, "sleep", {"seconds": 0.3, "marker": str(marker)})
    assert time.monotonic() - started >= 0.3
    assert out == {"slept": 0.3, "attempt": 1}
    assert marker.read_text() == f"step-1 1 {os.getpid()}\n"


def test_sleep_cancel_returns_early(catalog: PluginCatalog, ctx: PluginContext, rec: Recorder) -> None:
    threading.Timer(0.2, rec.cancel.set).start()
    # An hour's sleep: one the cancel did not cut short would fail the test on its timeout.
    with pytest.raises(SubtaskCancelled):
        plugin_fn(catalog, "sleep")(ctx, "sleep", {"seconds": 3600})


def test_sleep_deadline(catalog: PluginCatalog, tmp_path: Path, rec: Recorder) -> None:
    ctx = make_ctx(tmp_path, rec, timeout=0.2)
    with pytest.raises(SubtaskCancelled) as info:
        plugin_fn(catalog, "sleep")(ctx, "sleep", {"seconds": 30})
    assert info.value.timed_out


def test_sleep_fail_and_fail_times(catalog: PluginCatalog, tmp_path: Path, rec: Recorder) -> None:
    sleep = plugin_fn(catalog, "sleep")
    marker = tmp_path / "runs.log"
    with pytest.raises(RuntimeError, match=r"^asked to fail$"):
        sleep(make_ctx(tmp_path, rec), "sleep", {"seconds": 0, "fail": True})
    args = {"seconds": 0, "fail_times": 2, "marker": str(marker)}
    for attempt in (1, 2):
        with pytest.raises(RuntimeError, match=f"attempt {attempt}"):
            sleep(make_ctx(tmp_path, rec, attempt=attempt), "sleep", args)
    assert sleep(make_ctx(tmp_path, rec, attempt=3), "sleep", args) == {"slept": 0, "attempt": 3}
    assert [line.split()[1] for line in marker.read_text().splitlines()] == ["1", "2", "3"]
    with pytest.raises(ValueError, match="'seconds'"):
        sleep(make_ctx(tmp_path, rec), "sleep", {"seconds": -1})
