"""Built-in `knowledge_index` plugin: keep a persistent SQLite FTS5 index of pages up to date.

The index is one SQLite file, `<index_dir>/knowledge.sqlite3`:

* `documents`: one row per URL (title, content hash, summary, validators, times);
* `documents_fts`: FTS5 over title, text and summary, rowid = documents.id;
* `passages`: FTS5 over title and passage text (a few paragraphs each), rowid =
  documents.id * PASSAGE_SLOTS + position, so a document's passages are one
  rowid range;
* `meta`: the schema version.

An update applies one run's page records in a single transaction: a page whose
content hash equals the stored one is left alone (counted `unchanged`), a
changed one is replaced (`updated`), a new URL is `inserted`. A URL missing
from this run's list is kept (the index accumulates knowledge; a refresh of a
subset must not erase the rest) unless `prune` is true, which removes it. A
page that failed to fetch keeps its earlier version in the index.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgefleet.plugin_context import PluginContext
from edgefleet.pluginkit.actions import absolute_dir_arg, dispatch
from edgefleet.pluginkit.text import read_blocks

DB_FILENAME = "knowledge.sqlite3"
SCHEMA_VERSION = "1"
PASSAGE_SLOTS = 10_000
PASSAGE_MIN_WORDS = 40
PASSAGE_MAX_WORDS = 160
TOKENIZER = "porter unicode61 remove_diacritics 2"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY,
    url TEXT NOT NULL UNIQUE,
    final_url TEXT,
    title TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    summary TEXT NOT NULL DEFAULT '',
    summary_method TEXT,
    word_count INTEGER NOT NULL DEFAULT 0,
    etag TEXT,
    last_modified TEXT,
    fetched_at TEXT NOT NULL,
    checked_at TEXT NOT NULL,
    indexed_at TEXT NOT NULL
);
CREATE VIRTUAL TABLE IF NOT EXISTS documents_fts USING fts5(title, text, summary, tokenize='{TOKENIZER}');
CREATE VIRTUAL TABLE IF NOT EXISTS passages USING fts5(title, text, tokenize='{TOKENIZER}');
"""


class KnowledgeIndexError(RuntimeError):
    """The index cannot be used (wrong schema, no FTS5 in this SQLite)."""


def run(ctx: PluginContext, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """Entry point named in plugin.yaml."""
    return dispatch(ctx, action, args, plugin="knowledge_index", actions={"update": update})


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def open_index(db_path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(db_path, timeout=30, isolation_level=None)
    try:
        con.execute("PRAGMA busy_timeout = 30000")
        version = None
        if con.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = row[0] if row else None
        if version not in (None, SCHEMA_VERSION):
            raise KnowledgeIndexError(f"{db_path}: index schema version {version}, this plugin writes {SCHEMA_VERSION}")
        try:
            con.executescript("BEGIN IMMEDIATE;" + SCHEMA + "COMMIT;")
        except sqlite3.OperationalError as exc:
            if "fts5" in str(exc):
                raise KnowledgeIndexError(f"this Python's SQLite has no FTS5 module: {exc}") from exc
            raise
        con.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
    except BaseException:
        con.close()
        raise
    return con


# --- text and passages -----------------------------------------------------------------------


def passages_of(blocks: list[tuple[str, str]]) -> list[str]:
    """Group blocks into passages of about PASSAGE_MIN..MAX words; a heading opens a new passage."""
    passages: list[str] = []
    current: list[str] = []
    size = 0

    def close() -> None:
        nonlocal current, size
        if current:
            passages.append(" ".join(current))
        current, size = [], 0

    for kind, text in blocks:
        words = text.split()
        if kind == "heading" and size and not (len(current) == 1 and size < 12):
            close()
        while len(words) > PASSAGE_MAX_WORDS:  # a huge block: cut it into windows
            close()
            passages.append(" ".join(words[:PASSAGE_MAX_WORDS]))
            words = words[PASSAGE_MAX_WORDS:]
        if size and size + len(words) > PASSAGE_MAX_WORDS:
            close()
        current.append(" ".join(words))
        size += len(words)
        if kind != "heading" and size >= PASSAGE_MIN_WORDS:
            close()
    close()
    return [p for p in passages if p.strip()][: PASSAGE_SLOTS - 1]


# --- update ----------------------------------------------------------------------------------


def update(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    index_dir = absolute_dir_arg(args, "index_dir")
    pages = args.get("pages")
    if not isinstance(pages, list) or not all(isinstance(p, dict) and isinstance(p.get("url"), str) for p in pages):
        raise ValueError("'pages' must be a list of page records, each with a 'url'")
    prune = bool(args.get("prune", False))

    # Read every text file before taking the write lock, so the lock is held briefly.
    texts: dict[str, list[tuple[str, str]]] = {}
    for page in pages:
        if page.get("state") == "fetched" and page.get("text_path"):
            ctx.check_cancelled()
            texts[page["url"]] = read_blocks(ctx.input_path(page["text_path"]))

    index_dir.mkdir(parents=True, exist_ok=True)
    db_path = index_dir / DB_FILENAME
    counts = dict.fromkeys(("inserted", "updated", "unchanged", "failed", "skipped", "removed"), 0)
    changes: list[dict[str, str]] = []
    now = now_iso()
    con = open_index(db_path)
    try:
        con.execute("BEGIN IMMEDIATE")
        try:
            for page in pages:
                action = _apply(con, page, texts.get(page["url"]), now)
                counts[action] += 1
                changes.append({"url": page["url"], "action": action})
            if prune:
                wanted = {p["url"] for p in pages}
                for doc_id, url in con.execute("SELECT id, url FROM documents").fetchall():
                    if url not in wanted:
                        _delete(con, doc_id)
                        counts["removed"] += 1
                        changes.append({"url": url, "action": "removed"})
            ctx.check_cancelled()  # a cancel before commit leaves the index as it was
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        documents = con.execute("SELECT count(*) FROM documents").fetchone()[0]
    finally:
        con.close()
    ctx.progress(1.0, ", ".join(f"{n} {k}" for k, n in counts.items() if n))
    return {
        "index_dir": str(index_dir),
        "db_path": str(db_path),
        **counts,
        "documents": documents,
        "changes": changes,
    }


def _apply(con: sqlite3.Connection, page: dict[str, Any], blocks: list[tuple[str, str]] | None, now: str) -> str:
    url = page["url"]
    row = con.execute("SELECT id, content_hash FROM documents WHERE url = ?", (url,)).fetchone()
    state = page.get("state")
    if state == "failed":
        return "failed"  # an earlier version, if any, stays
    same_hash = state == "fetched" and row is not None and row[1] == page.get("content_hash")
    if state in ("not_modified", "same_content") or same_hash:
        if row is None:
            return "skipped"  # unchanged per the fetcher, but not (any more) in this index
        con.execute(
            "UPDATE documents SET checked_at = ?, etag = coalesce(?, etag), last_modified = coalesce(?, last_modified)"
            " WHERE id = ?",
            (now, page.get("etag"), page.get("last_modified"), row[0]),
        )
        return "unchanged"
    if state != "fetched":
        raise ValueError(f"page {url!r} has unknown state {state!r}")
    if blocks is None:
        return "failed"  # fetched but no text was extracted
    title = str(page.get("title") or url)
    summary = str(page.get("summary") or "")
    values = {
        "url": url,
        "final_url": page.get("final_url"),
        "title": title,
        "content_hash": str(page.get("content_hash") or ""),
        "summary": summary,
        "summary_method": page.get("method"),
        "word_count": int(page.get("word_count") or 0),
        "etag": page.get("etag"),
        "last_modified": page.get("last_modified"),
        "fetched_at": str(page.get("fetched_at") or now),
        "now": now,
    }
    if row is None:
        doc_id = con.execute(
            "INSERT INTO documents (url, final_url, title, content_hash, summary, summary_method, word_count,"
            " etag, last_modified, fetched_at, checked_at, indexed_at) VALUES (:url, :final_url, :title,"
            " :content_hash, :summary, :summary_method, :word_count, :etag, :last_modified, :fetched_at, :now, :now)",
            values,
        ).lastrowid
        action = "inserted"
    else:
        doc_id = row[0]
        con.execute(
            "UPDATE documents SET final_url = :final_url, title = :title, content_hash = :content_hash,"
            " summary = :summary, summary_method = :summary_method, word_count = :word_count, etag = :etag,"
            " last_modified = :last_modified, fetched_at = :fetched_at, checked_at = :now, indexed_at = :now"
            " WHERE id = :id",
            {**values, "id": doc_id},
        )
        _delete_text(con, doc_id)
        action = "updated"
    text = "\n\n".join(t for _, t in blocks)
    con.execute(
        "INSERT INTO documents_fts (rowid, title, text, summary) VALUES (?, ?, ?, ?)", (doc_id, title, text, summary)
    )
    con.executemany(
        "INSERT INTO passages (rowid, title, text) VALUES (?, ?, ?)",
        [(doc_id * PASSAGE_SLOTS + i, title, p) for i, p in enumerate(passages_of(blocks))],
    )
    return action


def _delete_text(con: sqlite3.Connection, doc_id: int) -> None:
    con.execute("DELETE FROM documents_fts WHERE rowid = ?", (doc_id,))
    con.execute(
        "DELETE FROM passages WHERE rowid >= ? AND rowid < ?", (doc_id * PASSAGE_SLOTS, (doc_id + 1) * PASSAGE_SLOTS)
    )


def _delete(con: sqlite3.Connection, doc_id: int) -> None:
    _delete_text(con, doc_id)
    con.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
