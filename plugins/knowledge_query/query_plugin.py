"""Built-in `knowledge_query` plugin: read a knowledge index (read-only) to answer questions.

* `validators`: the ETag / Last-Modified / content hash the index holds per
  URL, so that the fetcher can make conditional requests.
* `ask`: turn a question into a safe FTS5 query, rank passages with bm25, and
  answer with the best-matching sentences of the best source (or with
  ctx.model("qa") when a model serves it, falling back the same way).

The index is opened read-only (`mode=ro`), never created or changed here; the
`knowledge_index` plugin writes it (see its module for the schema).
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

from edgefleet.plugin_context import PluginContext
from edgefleet.pluginkit.actions import absolute_dir_arg, dispatch
from edgefleet.pluginkit.models import call_model, error_text, model_for
from edgefleet.pluginkit.text import STOP_WORDS as CORE_STOP_WORDS
from edgefleet.pluginkit.text import split_sentences

DB_FILENAME = "knowledge.sqlite3"
SCHEMA_VERSION = "1"
PASSAGE_SLOTS = 10_000  # passages.rowid = documents.id * PASSAGE_SLOTS + position
TOKENIZER = "porter unicode61 remove_diacritics 2"
MAX_QUERY_TERMS = 24
DEFAULT_TOP_K = 3
DEFAULT_ANSWER_SENTENCES = 2
MODEL_CONTEXT_CHARS = 6000
# bm25 column weights: a match in the title counts more than one in the body.
DOC_WEIGHTS = (4.0, 1.0, 2.0)  # title, text, summary
PASSAGE_WEIGHTS = (2.0, 1.0)  # title, text

# Tokens as FTS5's unicode61 tokenizer sees them: runs of letters and digits.
TOKEN_RE = re.compile(r"[^\W_]+")
# Words that say nothing about what is asked: the core stop words (question words, articles,
# FTS5's AND/OR/NOT), FTS5's NEAR, and the verbs of a request.
STOP_WORDS = CORE_STOP_WORDS | frozenset(("near", "tell", "explain", "describe", "please", "know"))


def run(ctx: PluginContext, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """Entry point named in plugin.yaml."""
    return dispatch(ctx, action, args, plugin="knowledge_query", actions={"validators": validators, "ask": ask})


def _db_path(args: dict[str, Any]) -> Path:
    return absolute_dir_arg(args, "index_dir") / DB_FILENAME


def open_readonly(db_path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(db_path.as_uri() + "?mode=ro", uri=True, timeout=30)
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as exc:
        con.close()
        raise ValueError(f"{db_path} is not a knowledge index: {exc}") from None
    if not row or row[0] != SCHEMA_VERSION:
        con.close()
        raise ValueError(f"{db_path}: index schema version {row[0] if row else None}, expected {SCHEMA_VERSION}")
    return con


# --- validators ------------------------------------------------------------------------------


def validators(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    db_path = _db_path(args)
    urls = args.get("urls")
    if urls is not None and not (isinstance(urls, list) and all(isinstance(u, str) for u in urls)):
        raise ValueError("'urls' must be a list of strings")
    if not db_path.is_file():
        return {"exists": False, "documents": 0, "validators": {}}
    con = open_readonly(db_path)
    try:
        rows = con.execute("SELECT url, etag, last_modified, content_hash FROM documents").fetchall()
    finally:
        con.close()
    wanted = set(urls) if urls is not None else None
    found = {
        url: {"etag": etag, "last_modified": last_modified, "content_hash": content_hash}
        for url, etag, last_modified, content_hash in rows
        if wanted is None or url in wanted
    }
    ctx.progress(1.0, f"{len(found)} known of {len(rows)} documents")
    return {"exists": True, "documents": len(rows), "validators": found}


# --- ask -------------------------------------------------------------------------------------


def question_terms(question: str) -> list[str]:
    """The searchable words of a question: lower-cased, stop words dropped, duplicates removed."""
    tokens = [t.lower() for t in TOKEN_RE.findall(question or "")]
    terms = [t for t in tokens if t not in STOP_WORDS and (len(t) > 1 or t.isdigit())]
    if not terms:  # "Who is The Who?" - better the plain words than nothing
        terms = [t for t in tokens if len(t) > 1]
    return list(dict.fromkeys(terms))[:MAX_QUERY_TERMS]


def fts_query(question: str) -> str:
    """A safe FTS5 MATCH expression for `question`: its terms, each a quoted string, joined by OR.

    Quoting makes every term a plain phrase, so user text can never be read
    as FTS5 syntax (AND/OR/NOT/NEAR, column filters `col:`, `*`, `^`, `-`,
    parentheses, unbalanced quotes). bm25 then ranks rows that match more
    (and rarer) terms higher. Returns "" when nothing searchable is left.
    """
    return " OR ".join(f'"{term}"' for term in question_terms(question))


def ask(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    db_path = _db_path(args)
    question = args.get("question")
    top_k = int(args.get("top_k", DEFAULT_TOP_K))
    n_sentences = int(args.get("answer_sentences", DEFAULT_ANSWER_SENTENCES))
    if not 1 <= top_k <= 50:
        raise ValueError("'top_k' must be between 1 and 50")
    if not 1 <= n_sentences <= 10:
        raise ValueError("'answer_sentences' must be between 1 and 10")
    result: dict[str, Any] = {
        "question": question,
        "query": "",
        "found": False,
        "answer": "",
        "method": None,
        "source": None,
        "passages": [],
        "documents": [],
        "model_error": None,
    }
    if question is None or not str(question).strip():
        result["reason"] = "no question given"
        return result
    if not isinstance(question, str):
        raise TypeError("'question' must be a string")
    if not db_path.is_file():
        raise FileNotFoundError(f"no knowledge index at {db_path}: run the knowledge-refresh workflow first")
    query = fts_query(question)
    result["query"] = query
    if not query:
        result["reason"] = "the question has no searchable words"
        return result

    con = open_readonly(db_path)
    try:
        passages = [
            {"url": url, "title": title, "text": text, "score": round(-score, 4), "doc_id": doc_id}
            for doc_id, url, title, text, score in con.execute(
                "SELECT d.id, d.url, d.title, p.text, bm25(passages, ?, ?) AS score"
                " FROM passages p JOIN documents d ON d.id = p.rowid / ?"
                " WHERE passages MATCH ? ORDER BY score LIMIT ?",
                (*PASSAGE_WEIGHTS, PASSAGE_SLOTS, query, top_k),
            )
        ]
        documents = [
            {"url": url, "title": title, "summary": summary, "snippet": snippet, "score": round(-score, 4)}
            for url, title, summary, snippet, score in con.execute(
                "SELECT d.url, d.title, d.summary, snippet(documents_fts, 1, '[', ']', '…', 24),"
                " bm25(documents_fts, ?, ?, ?) AS score"
                " FROM documents_fts f JOIN documents d ON d.id = f.rowid"
                " WHERE documents_fts MATCH ? ORDER BY score LIMIT ?",
                (*DOC_WEIGHTS, query, top_k),
            )
        ]
    finally:
        con.close()
    ctx.check_cancelled()
    result["documents"] = documents
    if not passages:
        result["passages"] = []
        result["reason"] = "no indexed page matches the question"
        return result

    best = passages[0]
    result["source"] = {"url": best["url"], "title": best["title"]}
    result["found"] = True
    answer = None
    if args.get("use_model", True):
        answer, result["model_error"] = _model_answer(ctx, question, passages)
    if answer is not None:
        result.update(answer=answer, method="model")
    else:
        same_source = [p["text"] for p in passages if p["doc_id"] == best["doc_id"]]
        result.update(answer=extractive_answer(query, same_source, n_sentences), method="extractive")
    result["passages"] = [{k: v for k, v in p.items() if k != "doc_id"} for p in passages]
    ctx.progress(1.0, "answered")
    return result


def extractive_answer(query: str, passages: list[str], n_sentences: int) -> str:
    """The `n_sentences` sentences of `passages` that best match `query` (bm25), in reading order."""
    sentences = [s for text in passages for s in split_sentences(text)]
    if not sentences:
        return ""
    scratch = sqlite3.connect(":memory:")
    try:
        scratch.execute(f"CREATE VIRTUAL TABLE s USING fts5(text, tokenize='{TOKENIZER}')")
        scratch.executemany("INSERT INTO s (rowid, text) VALUES (?, ?)", enumerate(sentences))
        ranked = [
            row[0]
            for row in scratch.execute(
                "SELECT rowid FROM s WHERE s MATCH ? ORDER BY bm25(s), rowid LIMIT ?", (query, n_sentences)
            )
        ]
    finally:
        scratch.close()
    if not ranked:  # the passage matched on its title only
        ranked = [0]
    return " ".join(sentences[i] for i in sorted(ranked))


def _model_answer(ctx: PluginContext, question: str, passages: list[dict[str, Any]]) -> tuple[str | None, str | None]:
    """ctx.model("qa")'s answer from the passages, or (None, why not)."""
    model, model_error = model_for(ctx, "qa")
    if model_error is not None:
        return None, model_error
    try:
        context = ""
        for p in passages:
            piece = f"[{p['title']}] ({p['url']})\n{p['text']}\n\n"
            if len(context) + len(piece) > MODEL_CONTEXT_CHARS:
                break
            context += piece
        prompt = (
            "Answer the question from the sources below in one or two sentences. "
            "If they do not contain the answer, say so.\n\n"
            f"Sources:\n{context}Question: {question}\nAnswer:"
        )
        answer = " ".join(call_model(model, prompt, max_tokens=120).split())
        if len(TOKEN_RE.findall(answer)) < 2:
            raise ValueError(f"model answered nothing usable: {answer[:80]!r}")
        return answer, None
    except Exception as exc:
        return None, error_text(exc)
