"""Scenario 3, `knowledge-refresh`: fetch pages, extract, summarize, index into SQLite FTS5, answer.

The plugins are called directly with a real PluginContext on tmp_path for the
tricky parts (HTML extraction, query sanitization, conditional fetches, the
index's update rules), then the two workflow templates run on a real cluster
against pages served by a real HTTP server that the test starts.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from http.server import (
    BaseHTTPRequestHandler,
    SimpleHTTPRequestHandler,
)
from pathlib import Path
from typing import Any, ClassVar

import pytest

from edgefleet.plugin_catalog import PluginCatalog, builtin_plugin_dir
from edgefleet.plugin_context import ModelUnavailable, PluginContext
from edgefleet.plugin_manifest import Permission
from tests.conftest import Cluster, FakeInternet, serving

KNOWLEDGE_PLUGINS = ("web", "knowledge", "knowledge_index", "knowledge_query")

BOILERPLATE_HEAD = """<script>var tracker = "BOILERPLATE-SCRIPT";</script>
<style>body { color: red } /* BOILERPLATE-STYLE */</style>"""
BOILERPLATE_NAV = '<nav><a href="/">Home</a> <a href="/about">BOILERPLATE-NAV</a></nav>'
BOILERPLATE_FOOTER = "<footer>Copyright BOILERPLATE-FOOTER 2024</footer>"

PAGES = {
    "photosynthesis.html": (
        "Photosynthesis in plants",
        [
            "Photosynthesis is the process by which green plants turn sunlight into chemical energy.",
            "Chlorophyll in the leaves absorbs red and blue light and passes the energy to the reaction centres.",
            "The plant combines carbon dioxide from the air with water from the soil to build glucose.",
            "Oxygen is released as a by-product, which is why forests and algae keep the air breathable.",
            "Plants store the glucose as starch and burn it later for growth when there is no light.",
        ],
    ),
    "volcanoes.html": (
        "How volcanoes erupt",
        [
            "A volcano is an opening in the crust where molten rock, ash and gases escape from below.",
            "Magma rises because it is lighter than the solid rock around it, collecting in a magma chamber.",
            "When the pressure of dissolved gases grows too large, the magma chamber empties in an eruption.",
            "Lava flows from shield volcanoes are runny, while explosive eruptions come from sticky, gas-rich magma.",
            "Volcanic ash can ground aircraft and cool the climate for years after a large eruption.",
        ],
    ),
    "sourdough.html": (
        "Baking sourdough bread",
        [
            "Sourdough bread rises with a starter of wild yeast and lactic acid bacteria instead of baker's yeast.",
            "The baker feeds the starter with flour and water every day until it doubles reliably.",
            "A long, cool fermentation of the dough develops the sour flavour and an open crumb.",
            "The loaf is baked in a very hot covered pot so that steam keeps the crust soft while it expands.",
            "A good sourdough crust is dark, crisp and crackles as the bread cools on a rack.",
        ],
    ),
    "aqueducts.html": (
        "Roman aqueducts",
        [
            "The Romans built aqueducts to carry fresh water from distant springs into their cities.",
            "Engineers kept a tiny, steady downhill gradient over dozens of kilometres so gravity moved the water.",
            "Most of each aqueduct ran underground in channels; the famous arches carried it across valleys.",
            "In the city the water filled public fountains, baths and the houses of the rich.",
            "The Aqua Appia of 312 BC was the first aqueduct of Rome and ran almost entirely underground.",
        ],
    ),
}
KRAKATOA = (
    "In 1883 the eruption of Krakatoa destroyed most of the island and its sound was heard "
    "nearly five thousand kilometres away."
)


def page_html(title: str, paragraphs: list[str]) -> str:
    body = "\n".join(f"<p>{p}</p>" for p in paragraphs)
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title>{BOILERPLATE_HEAD}</head>'
        f"<body>{BOILERPLATE_NAV}<main><h1>{title}</h1>\n{body}</main>{BOILERPLATE_FOOTER}</body></html>"
    )


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog() -> PluginCatalog:
    loaded = PluginCatalog.load([builtin_plugin_dir()])
    for name in KNOWLEDGE_PLUGINS:
        assert loaded.get(name) is not None, [str(e) for e in loaded.errors]
    return loaded


def plugin_fn(catalog: PluginCatalog, name: str) -> Callable[[PluginContext, str, dict[str, Any]], dict[str, Any]]:
    plugin = catalog.get(name)
    assert plugin is not None
    return plugin.load_callable()


def make_ctx(workspace: Path, ctx_class: type[PluginContext] = PluginContext) -> PluginContext:
    workspace.mkdir(parents=True, exist_ok=True)
    return ctx_class(
        job_id="job-k", subtask_id=workspace.name, attempt=1, workspace=workspace, deadline=time.monotonic() + 60
    )


@pytest.fixture()
def site(tmp_path: Path, fake_internet: FakeInternet | None) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on the fake internet (else 127.0.0.1) serving tmp_path/site (Last-Modified and
    If-Modified-Since included): sandboxed `network` plugins never reach the host's loopback."""
    root = tmp_path / "site"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

    with serving(functools.partial(Quiet, directory=str(root)), fake_internet) as base:
        yield base, root


def write_pages(root: Path, mtime: float) -> None:
    for name, (title, paragraphs) in PAGES.items():
        path = root / name
        path.write_text(page_html(title, paragraphs), encoding="utf-8")
        os.utime(path, (mtime, mtime))


# --- manifests -----------------------------------------------------------------------------------


def test_each_plugin_declares_only_what_it_needs(catalog: PluginCatalog) -> None:
    perms = {name: set(catalog.get(name).manifest.permissions) for name in KNOWLEDGE_PLUGINS}  # type: ignore[union-attr]
    assert perms == {
        "web": {Permission.network},  # fetches; writes only its workspace
        "knowledge": set(),  # pure computation on the job's files
        "knowledge_index": {Permission.file_system_write},  # the index dir; no network
        "knowledge_query": {Permission.file_system_read},  # reads the index dir; no network, no writes
    }
    assert catalog.get("web").manifest.resource_class.value == "io"  # type: ignore[union-attr]


# --- extraction ----------------------------------------------------------------------------------

TRICKY = """<!DOCTYPE html>
<HTML lang=fr>
<head>
  <meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1">
  <title>Caf\xe9 &amp; Cr\xe8me &#8212; a guide</title>
  <script type="text/javascript">
    document.write("<div>SCRIPT-TEXT</div>"); if (a < b && c > d) { x = "</p>"; }
  </script>
  <style>p::after { content: "STYLE-TEXT" }</style>
</head>
<body>
<header><div class=logo>Site logo</div><nav><ul><li><a href=/>NAV-HOME</a><li><a href=/x>NAV-MENU</a></ul></nav></header>
<!-- COMMENT-TEXT <p>commented out</p> -->
<article>
  <h1>Caf\xe9 culture</h1>
  <P>The first paragraph has <b>bold</b>, <i>italic</i> and a <a href="#">link</a>, all inline.
  <p>An unclosed paragraph with an entity: caf&eacute; &lt;noir&gt; &amp; cr&egrave;me&nbsp;br&ucirc;l&eacute;e.
  <h2>Brewing</h2>
  <ul><li>Grind the beans.<li>Heat the water to 94 degrees.</ul>
  <div hidden>HIDDEN-TEXT</div>
  <div aria-hidden="true"><span>ARIA-HIDDEN-TEXT</span></div>
  <div style="display: none">DISPLAY-NONE-TEXT</div>
  <p>Line one<br>line two<br/>line three.</p>
  <table><tr><th>Drink</th><th>Price</th></tr><tr><td>Espresso</td><td>2.10</td></tr></table>
  <img src=cup.png alt="A steaming cup">
  <aside>ASIDE-TEXT</aside>
  <form><label>FORM-TEXT</label><input name=q><button>BUTTON-TEXT</button></form>
  <noscript>NOSCRIPT-TEXT</noscript>
  <svg><title>SVG-TITLE</title><text>SVG-TEXT</text></svg>
  <p>Closing thoughts after the embedded bits.</p>
</article>
<div role="navigation">ROLE-NAV-TEXT</div>
<footer><p>FOOTER-TEXT</p></footer>
</body></HTML>
"""


def test_extract_tricky_html(catalog: PluginCatalog, tmp_path: Path) -> None:
    fetch_ws = tmp_path / "job" / "fetch"
    (fetch_ws / "pages").mkdir(parents=True)
    body = fetch_ws / "pages" / "0000-cafe.html"
    body.write_bytes(TRICKY.encode("iso-8859-1"))  # the charset only the <meta> tag names
    page = {
        "url": "http://example.test/cafe",
        "state": "fetched",
        "path": str(body),
        "content_type": "text/html",
        "content_hash": "sha256:x",
    }
    unchanged = {"url": "http://example.test/old", "state": "not_modified", "path": None}
    ctx = make_ctx(tmp_path / "job" / "extract")

    out = plugin_fn(catalog, "knowledge")(ctx, "extract", {"pages": [page, unchanged]})

    assert out["extracted"] == 1 and out["failed"] == 0
    got, passed = out["pages"]
    assert passed == unchanged  # not changed since the last refresh: passed through untouched
    assert got["title"] == "Café & Crème — a guide"
    text_path = Path(got["text_path"])
    assert text_path.is_relative_to(ctx.workspace) and text_path.is_file()
    text = text_path.read_text(encoding="utf-8")
    for kept in (
        "# Café culture",
        "# Brewing",
        "The first paragraph has bold, italic and a link, all inline.",
        "café <noir> & crème brûlée.",
        "Grind the beans.",
        "Heat the water to 94 degrees.",
        "line two",
        "Espresso 2.10",
        "A steaming cup",
        "Closing thoughts after the embedded bits.",
        "Site logo",
    ):
        assert kept in text, (kept, text)
    for dropped in (
        "SCRIPT-TEXT",
        "STYLE-TEXT",
        "NAV-HOME",
        "NAV-MENU",
        "COMMENT-TEXT",
        "commented out",
        "HIDDEN-TEXT",
        "ARIA-HIDDEN-TEXT",
        "DISPLAY-NONE-TEXT",
        "ASIDE-TEXT",
        "FORM-TEXT",
        "BUTTON-TEXT",
        "NOSCRIPT-TEXT",
        "SVG-TITLE",
        "SVG-TEXT",
        "ROLE-NAV-TEXT",
        "FOOTER-TEXT",
        "<b>",
        "&amp;",
        "</p>",
    ):
        assert dropped not in text, (dropped, text)
    # Block structure: each paragraph, heading and list item is its own block, in order.
    blocks = text.strip().split("\n\n")
    assert blocks.index("# Café culture") < blocks.index("# Brewing") < blocks.index("Grind the beans.")
    assert got["word_count"] == sum(len(b.replace("# ", "", 1).split()) for b in blocks)


def test_extract_plain_text_and_unsupported(catalog: PluginCatalog, tmp_path: Path) -> None:
    src = tmp_path / "job" / "fetch"
    src.mkdir(parents=True)
    (src / "notes.txt").write_text("Release notes\n\nVersion two adds search.\nIt also fixes bugs.\n")
    (src / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    pages = [
        {
            "url": "http://x.test/notes.txt",
            "state": "fetched",
            "path": str(src / "notes.txt"),
            "content_type": "text/plain; charset=utf-8",
        },
        {
            "url": "http://x.test/photo.png",
            "state": "fetched",
            "path": str(src / "photo.png"),
            "content_type": "image/png",
        },
    ]
    out = plugin_fn(catalog, "knowledge")(make_ctx(tmp_path / "job" / "extract"), "extract", {"pages": pages})
    notes, photo = out["pages"]
    assert notes["title"] == "Release notes" and notes["word_count"] == 10
    assert photo["state"] == "failed" and "unsupported content type 'image/png'" in photo["error"]
    assert (out["extracted"], out["failed"]) == (1, 1)


# --- summaries -----------------------------------------------------------------------------------


class _Model:
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.prompts: list[str] = []

    def generate(self, prompt: str, max_tokens: int = 100) -> Any:
        self.prompts.append(prompt)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _ctx_with_model(model: _Model | None) -> type[PluginContext]:
    class WithModel(PluginContext):
        def model(self, task_type: str) -> Any:
            if model is None:
                return super().model(task_type)
            return model

    return WithModel


def _extracted_pages(catalog: PluginCatalog, tmp_path: Path) -> list[dict[str, Any]]:
    src = tmp_path / "job" / "fetch"
    src.mkdir(parents=True, exist_ok=True)
    pages = []
    for n, (name, (title, paragraphs)) in enumerate(PAGES.items()):
        (src / name).write_text(page_html(title, paragraphs), encoding="utf-8")
        pages.append(
            {
                "url": f"http://x.test/{name}",
                "state": "fetched",
                "path": str(src / name),
                "content_type": "text/html",
                "content_hash": f"sha256:{n}",
            }
        )
    return plugin_fn(catalog, "knowledge")(make_ctx(tmp_path / "job" / "extract"), "extract", {"pages": pages})["pages"]


def test_summarize_falls_back_to_extractive(catalog: PluginCatalog, tmp_path: Path) -> None:
    pages = _extracted_pages(catalog, tmp_path)
    summarize = plugin_fn(catalog, "knowledge")

    # The model layer is not there yet: ctx.model raises ModelUnavailable.
    with pytest.raises(ModelUnavailable):
        make_ctx(tmp_path / "probe").model("summarize")
    out = summarize(make_ctx(tmp_path / "job" / "s1"), "summarize", {"pages": pages, "sentences": 2})
    assert (out["model"], out["extractive"]) == (0, 4) and "ModelUnavailable" in out["model_error"]
    for page in out["pages"]:
        _, paragraphs = PAGES[page["url"].rsplit("/", 1)[1]]
        assert page["method"] == "extractive"
        chosen = [p for p in paragraphs if p in page["summary"]]
        assert len(chosen) == 2 and page["summary"] == " ".join(chosen)  # whole sentences, in page order
        assert "BOILERPLATE" not in page["summary"]

    # A model that serves "summarize" is used...
    good = _Model({"text": "  Plants make sugar from light.  "})
    out = summarize(make_ctx(tmp_path / "job" / "s2", _ctx_with_model(good)), "summarize", {"pages": pages[:1]})
    assert out["pages"][0]["method"] == "model" and out["pages"][0]["summary"] == "Plants make sugar from light."
    assert "Photosynthesis is the process" in good.prompts[0]
    # ...and one that fails or answers garbage falls back, page by page.
    for bad in (_Model(RuntimeError("model crashed")), _Model(""), _Model(42)):
        out = summarize(make_ctx(tmp_path / "job" / "s3", _ctx_with_model(bad)), "summarize", {"pages": pages[:2]})
        assert [p["method"] for p in out["pages"]] == ["extractive", "extractive"]
        assert out["model_error"] and all(p["summary"] for p in out["pages"])


# --- fetching ------------------------------------------------------------------------------------


class _ValidatorHandler(BaseHTTPRequestHandler):
    """/etag answers 304 to a matching If-None-Match; /plain has no validators; /gone is 404."""

    protocol_version = "HTTP/1.1"
    etag_body = b"<html><title>E</title><p>etag page</p></html>"
    seen: ClassVar[list[dict[str, str]]] = []

    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:
        type(self).seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        if self.path == "/etag":
            if self.headers.get("If-None-Match") == '"v1"':
                self.send_response(304)
                self.send_header("ETag", '"v1"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._send(200, self.etag_body, etag='"v1"')
        elif self.path == "/plain":
            self._send(200, b"<html><p>same every time</p></html>")
        else:
            self._send(404, b"gone")

    def _send(self, status: int, body: bytes, etag: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if etag:
            self.send_header("ETag", etag)
        self.end_headers()
        self.wfile.write(body)


def test_fetch_conditional_requests_and_hashes(catalog: PluginCatalog, tmp_path: Path) -> None:
    fetch = plugin_fn(catalog, "web")
    with serving(_ValidatorHandler) as base:
        urls = [f"{base}/etag", f"{base}/plain", f"{base}/gone", f"{base}/etag"]
        first = fetch(make_ctx(tmp_path / "f1"), "fetch_pages", {"urls": urls})
        assert [p["state"] for p in first["pages"]] == ["fetched", "fetched", "failed"]  # duplicate dropped
        etag, plain, gone = first["pages"]
        assert etag["etag"] == '"v1"' and etag["status"] == 200
        assert Path(etag["path"]).read_bytes() == _ValidatorHandler.etag_body
        assert etag["content_hash"].startswith("sha256:") and len(etag["content_hash"]) == 7 + 64
        assert gone["status"] == 404 and "HTTP 404" in gone["error"] and gone["path"] is None
        assert (first["fetched"], first["failed"]) == (2, 1)

        validators = {p["url"]: {k: p[k] for k in ("etag", "last_modified", "content_hash")} for p in (etag, plain)}
        _ValidatorHandler.seen.clear()
        second = fetch(make_ctx(tmp_path / "f2"), "fetch_pages", {"urls": urls[:2], "validators": validators})
        etag2, plain2 = second["pages"]
        assert etag2["state"] == "not_modified" and etag2["status"] == 304 and etag2["path"] is None
        assert etag2["content_hash"] == etag["content_hash"]
        assert plain2["state"] == "same_content" and plain2["path"] is None  # no validators: the hash decides
        sent = {s["path"]: s for s in _ValidatorHandler.seen}
        assert sent["/etag"]["if-none-match"] == '"v1"' and "if-none-match" not in sent["/plain"]
        assert list((tmp_path / "f2" / "pages").iterdir()) == []  # unchanged bodies are not kept

        # A redelivered attempt resumes: what its checkpoint holds (file still there) is not fetched again.
        _ValidatorHandler.seen.clear()
        resumed = PluginContext(
            job_id="job-k",
            subtask_id="f1",
            attempt=2,
            workspace=tmp_path / "f1",
            deadline=time.monotonic() + 60,
            checkpoint={"pages": {etag["url"]: etag}},
        )
        third = fetch(resumed, "fetch_pages", {"urls": urls[:2]})
        assert [s["path"] for s in _ValidatorHandler.seen] == ["/plain"]
        assert third["pages"][0] == etag and third["fetched"] == 2

        with pytest.raises(RuntimeError, match="all 1 page"):
            fetch(make_ctx(tmp_path / "f3"), "fetch_pages", {"urls": [f"{base}/gone"]})


# --- index and questions -------------------------------------------------------------------------


def test_fts_query_sanitizes_questions(catalog: PluginCatalog) -> None:
    query_module = __import__(plugin_fn(catalog, "knowledge_query").__module__, fromlist=["fts_query"])
    fts_query = query_module.fts_query
    nasty = 'What is "photo* synthesis" AND NOT NEAR(chlorophyll, 2) OR title:leaf -root ^stem (x OR "'
    query = fts_query(nasty)
    # Operators and stop words gone, punctuation gone, numbers kept, one-letter words dropped.
    assert query == '"photo" OR "synthesis" OR "chlorophyll" OR "2" OR "title" OR "leaf" OR "root" OR "stem"'

    assert fts_query("Don't the plants' leaves?") == '"don" OR "plants" OR "leaves"'
    assert fts_query("What is it?") == '"what" OR "is" OR "it"'  # only stop words: keep them rather than nothing
    assert fts_query("?!* ()") == ""
    # Every sanitized query is valid FTS5 syntax and matches as plain words.
    con = sqlite3.connect(":memory:")
    con.execute("CREATE VIRTUAL TABLE t USING fts5(title, text, tokenize='porter unicode61 remove_diacritics 2')")
    con.execute("INSERT INTO t VALUES ('Leaves', 'Chlorophyll makes leaves green')")
    for question in (nasty, 'a"b', "NEAR", "col:val", "*", "AND OR NOT", "x'); DROP TABLE t; --", "Ünïcödé naïve?"):
        q = fts_query(question)
        if q:
            con.execute("SELECT count(*) FROM t WHERE t MATCH ?", (q,)).fetchone()
    assert con.execute("SELECT count(*) FROM t WHERE t MATCH ?", (query,)).fetchone()[0] == 1


def test_index_updates_only_what_changed(catalog: PluginCatalog, tmp_path: Path) -> None:
    pages = _extracted_pages(catalog, tmp_path)
    summarized = plugin_fn(catalog, "knowledge")(make_ctx(tmp_path / "job" / "sum"), "summarize", {"pages": pages})[
        "pages"
    ]
    index, query = plugin_fn(catalog, "knowledge_index"), plugin_fn(catalog, "knowledge_query")
    index_dir = tmp_path / "kb"

    first = index(make_ctx(tmp_path / "i1"), "update", {"index_dir": str(index_dir), "pages": summarized})
    assert (first["inserted"], first["updated"], first["unchanged"], first["documents"]) == (4, 0, 0, 4)

    # Same hashes again (fetched without validators): nothing rewritten.
    again = index(make_ctx(tmp_path / "i2"), "update", {"index_dir": str(index_dir), "pages": summarized})
    assert (again["inserted"], again["updated"], again["unchanged"]) == (0, 0, 4)

    # One page changed, one failed (its old version stays), one dropped from the list (kept).
    changed = dict(summarized[1], content_hash="sha256:new", summary="New volcano summary.")
    failed = {"url": summarized[2]["url"], "state": "failed", "error": "HTTP 500"}
    third = index(
        make_ctx(tmp_path / "i3"), "update", {"index_dir": str(index_dir), "pages": [summarized[0], changed, failed]}
    )
    assert (third["inserted"], third["updated"], third["unchanged"], third["failed"], third["removed"]) == (
        0,
        1,
        1,
        1,
        0,
    )
    assert third["documents"] == 4

    validators = query(make_ctx(tmp_path / "q0"), "validators", {"index_dir": str(index_dir)})
    assert validators["documents"] == 4 and validators["validators"][changed["url"]]["content_hash"] == "sha256:new"
    assert query(make_ctx(tmp_path / "q1"), "validators", {"index_dir": str(tmp_path / "none")}) == {
        "exists": False,
        "documents": 0,
        "validators": {},
    }

    answer = query(
        make_ctx(tmp_path / "q2"), "ask", {"index_dir": str(index_dir), "question": "Why does bread dough taste sour?"}
    )
    assert answer["found"] and answer["method"] == "extractive"
    assert answer["source"]["url"].endswith("/sourdough.html")
    assert answer["passages"][0]["url"].endswith("/sourdough.html") and "sour" in answer["answer"]
    assert "sour flavour" in answer["answer"]

    # prune removes what the run's list no longer names.
    pruned = index(
        make_ctx(tmp_path / "i4"), "update", {"index_dir": str(index_dir), "pages": [summarized[0]], "prune": True}
    )
    assert (pruned["unchanged"], pruned["removed"], pruned["documents"]) == (1, 3, 1)
    con = sqlite3.connect(index_dir / "knowledge.sqlite3")
    assert con.execute("SELECT count(*) FROM documents_fts").fetchone()[0] == 1
    assert {r[0] // 10_000 for r in con.execute("SELECT rowid FROM passages")} == {
        con.execute("SELECT id FROM documents").fetchone()[0]
    }
    con.close()

    nothing = query(make_ctx(tmp_path / "q3"), "ask", {"index_dir": str(index_dir), "question": "zeppelin airship"})
    assert not nothing["found"] and nothing["passages"] == [] and nothing["reason"]
    with pytest.raises(FileNotFoundError, match="run the knowledge-refresh workflow first"):
        query(make_ctx(tmp_path / "q4"), "ask", {"index_dir": str(tmp_path / "none"), "question": "x"})
    with pytest.raises(ValueError, match="absolute path"):
        index(make_ctx(tmp_path / "i5"), "update", {"index_dir": "relative/kb", "pages": []})


# --- the workflow on a real cluster --------------------------------------------------------------


def _outputs(done: dict[str, Any]) -> dict[str, Any]:
    return {st["id"]: st["output"] for st in done["subtasks"]}


def test_knowledge_refresh_and_ask_on_a_cluster(
    cluster_factory: Callable[..., Cluster], site: tuple[str, Path], tmp_path: Path
) -> None:
    base, root = site
    write_pages(root, mtime=time.time() - 3600)
    urls = [f"{base}/{name}" for name in PAGES]
    index_dir = tmp_path / "knowledge-index"

    # No model routes: the summaries and answers here are the extractive ones, checked word for word.
    # (With a model installed the same steps use it; tests/test_model_cluster.py covers that path.)
    no_models = tmp_path / "no-models.yaml"
    no_models.write_text("models: {}\nroutes: {}\n")
    # The index lives in a folder the operator shares with the two plugins that keep and read it.
    index_dir.mkdir()
    index_dir.chmod(0o777)
    cluster = cluster_factory(
        EDGEFLEET_MODELS_FILE=str(no_models),
        EDGEFLEET_PLUGIN_WRITE_PATHS=json.dumps({"knowledge_index": [str(index_dir)]}),
        EDGEFLEET_PLUGIN_READ_PATHS=json.dumps({"knowledge_query": [str(index_dir)]}),
    )
    cluster.start_router()
    cluster.start_node("n1", classes="cpu,io")
    cluster.wait_nodes_ready("n1")

    # First run: everything is new.
    job = cluster.submit(
        {
            "template": "knowledge-refresh",
            "inputs": {
                "urls": urls,
                "index_dir": str(index_dir),
                "question": "How do plants turn sunlight into chemical energy?",
            },
        }
    )
    done = cluster.wait_job(job["id"], timeout=60)
    assert done["state"] == "succeeded", done
    out = _outputs(done)
    assert out["prior"]["exists"] is False
    assert out["fetch"]["fetched"] == 4
    assert out["index"]["inserted"] == 4 and out["index"]["updated"] == 0 and out["index"]["unchanged"] == 0
    for page in out["summarize"]["pages"]:
        assert page["method"] == "extractive" and page["summary"].strip()
        assert "BOILERPLATE" not in page["summary"]
        title, paragraphs = PAGES[page["url"].rsplit("/", 1)[1]]
        assert page["title"] == title and any(p in page["summary"] for p in paragraphs)
    answer = out["answer"]
    assert answer["found"] and answer["source"]["url"] == f"{base}/photosynthesis.html"
    assert answer["passages"][0]["url"] == f"{base}/photosynthesis.html"
    assert "sunlight into chemical energy" in answer["answer"]
    assert (index_dir / "knowledge.sqlite3").is_file()

    # Change one page (a later Last-Modified), run again: only it is refetched and re-indexed.
    volcano = root / "volcanoes.html"
    title, paragraphs = PAGES["volcanoes.html"]
    volcano.write_text(page_html(title, [*paragraphs, KRAKATOA]), encoding="utf-8")
    os.utime(volcano, (time.time(), time.time()))
    job = cluster.submit({"template": "knowledge-refresh", "inputs": {"urls": urls, "index_dir": str(index_dir)}})
    done = cluster.wait_job(job["id"], timeout=60)
    assert done["state"] == "succeeded", done
    out = _outputs(done)
    assert out["prior"]["documents"] == 4
    assert out["fetch"]["not_modified"] == 3 and out["fetch"]["fetched"] == 1  # conditional requests
    assert out["summarize"]["summarized"] == 1
    assert out["index"]["updated"] == 1 and out["index"]["unchanged"] == 3 and out["index"]["inserted"] == 0
    assert {c["url"] for c in out["index"]["changes"] if c["action"] == "updated"} == {f"{base}/volcanoes.html"}
    assert out["answer"]["found"] is False and out["answer"]["reason"] == "no question given"

    # knowledge-ask answers from the index alone, with the updated content.
    job = cluster.submit(
        {
            "template": "knowledge-ask",
            "inputs": {"index_dir": str(index_dir), "question": 'What happened when "Krakatoa" erupted in 1883?'},
        }
    )
    done = cluster.wait_job(job["id"], timeout=30)
    assert done["state"] == "succeeded", done
    answer = _outputs(done)["answer"]
    assert answer["found"] and answer["method"] == "extractive"
    assert answer["source"]["url"] == f"{base}/volcanoes.html"
    assert "Krakatoa" in answer["answer"]
    assert answer["documents"][0]["url"] == f"{base}/volcanoes.html"
