"""Built-in `knowledge` plugin: readable text from fetched pages, and summaries of it.

Both actions take and return the list of page records that the `web` plugin's
`fetch_pages` produced, adding fields; pages whose state is not `fetched`
(unchanged since the last refresh, or failed) pass through untouched, so that
only what changed is extracted, summarized and later re-indexed.

Needs no permissions: it reads the earlier step's files in the job's directory
and writes only its own workspace.
"""

from __future__ import annotations

import time
from typing import Any

from edgefleet.plugin_context import PluginContext
from edgefleet.pluginkit.actions import dispatch
from edgefleet.pluginkit.models import call_model, error_text, model_for
from edgefleet.pluginkit.text import read_blocks, render_blocks

try:  # loaded as the package edgefleet_plugins.knowledge (the plugin catalog)
    from . import extractive
    from .htmltext import (
        decode_body,
        extract_html,
        extract_plain,
        is_text_type,
        looks_like_html,
    )
except ImportError:  # loaded as a bare module with the plugin folder on sys.path (the sandbox launcher)
    import extractive  # type: ignore[no-redef]
    from htmltext import (  # type: ignore[no-redef]
        decode_body,
        extract_html,
        extract_plain,
        is_text_type,
        looks_like_html,
    )

MAX_BODY_BYTES = 64 * 1024 * 1024
CHECKPOINT_EVERY_S = 1.0
DEFAULT_SENTENCES = 3
MODEL_INPUT_CHARS = 8000
# After this many model errors in one step, the rest of the pages go extractive directly.
MAX_MODEL_ERRORS = 2
# A summarizing model may put its text under `summary` too.
ANSWER_KEYS = ("text", "content", "summary", "answer")


def run(ctx: PluginContext, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """Entry point named in plugin.yaml."""
    return dispatch(ctx, action, args, plugin="knowledge", actions={"extract": extract, "summarize": summarize})


def _pages(args: dict[str, Any]) -> list[dict[str, Any]]:
    pages = args.get("pages")
    if not isinstance(pages, list) or not all(isinstance(p, dict) and isinstance(p.get("url"), str) for p in pages):
        raise ValueError("'pages' must be a list of page records, each with a 'url'")
    return [dict(p) for p in pages]


# --- extract ---------------------------------------------------------------------------------


def extract(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    pages = _pages(args)
    todo = [p for p in pages if p.get("state") == "fetched"]
    extracted = seen = 0
    for n, page in enumerate(pages):
        if page.get("state") != "fetched":
            continue
        ctx.check_cancelled()
        seen += 1
        try:
            _extract_page(ctx, n, page)
            extracted += 1
        except (OSError, ValueError) as exc:
            # One unreadable page must not sink the others; the indexer counts it as failed.
            page.update(state="failed", error=f"extract: {exc}", text_path=None, word_count=0)
        ctx.progress(seen / max(1, len(todo)), f"{seen} of {len(todo)} pages")
    failed = sum(1 for p in todo if p.get("state") == "failed")
    return {"pages": pages, "extracted": extracted, "failed": failed}


def _extract_page(ctx: PluginContext, n: int, page: dict[str, Any]) -> None:
    if not page.get("path"):
        raise ValueError("page has no saved body ('path')")
    source = ctx.input_path(page["path"])
    if source.stat().st_size > MAX_BODY_BYTES:
        raise ValueError(f"body larger than {MAX_BODY_BYTES} bytes")
    body = source.read_bytes()
    content_type = page.get("content_type")
    if not is_text_type(content_type):
        raise ValueError(f"unsupported content type {content_type!r}")
    text = decode_body(body, content_type)
    doc = extract_html(text) if looks_like_html(body, content_type) else extract_plain(text)
    title = doc.title or page.get("final_url") or page["url"]
    target = ctx.workspace_path(f"text/{n:04d}.txt")
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.part")
    part.write_text(render_blocks(doc.blocks), encoding="utf-8")
    part.replace(target)
    page.update(
        title=title,
        text_path=str(target),
        word_count=sum(len(extractive.words(t)) for _, t in doc.blocks),
    )


# --- summarize -------------------------------------------------------------------------------


def summarize(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    pages = _pages(args)
    sentences = int(args.get("sentences", DEFAULT_SENTENCES))
    if not 1 <= sentences <= 20:
        raise ValueError("'sentences' must be between 1 and 20")
    use_model = bool(args.get("use_model", True))

    previous = ctx.resume()
    done: dict[str, dict[str, Any]] = {}
    if isinstance(previous, dict) and isinstance(previous.get("summaries"), dict):
        done = dict(previous["summaries"])

    model, model_error = model_for(ctx, "summarize") if use_model else (None, None)
    model_failures = 0

    todo = [p for p in pages if p.get("state") == "fetched" and p.get("text_path")]
    last_checkpoint = time.monotonic()
    for n, page in enumerate(todo, start=1):
        ctx.check_cancelled()
        key = f"{page['url']}|{page.get('content_hash')}"
        if key not in done:
            blocks = read_blocks(ctx.input_path(page["text_path"]))
            paragraphs = [text for kind, text in blocks if kind == "text"] or [text for _, text in blocks]
            title = str(page.get("title") or "")
            result = None
            if model is not None and model_failures < MAX_MODEL_ERRORS:
                try:
                    result = _model_summary(model, title, paragraphs, sentences)
                except Exception as exc:
                    model_failures += 1
                    model_error = error_text(exc)
            if result is not None:
                done[key] = {"summary": result, "method": "model"}
            else:
                done[key] = {
                    "summary": extractive.summarize(paragraphs, title=title, max_sentences=sentences),
                    "method": "extractive",
                }
        page.update(done[key])
        ctx.progress(n / max(1, len(todo)), f"{n} of {len(todo)} pages")
        if time.monotonic() - last_checkpoint >= CHECKPOINT_EVERY_S and n < len(todo):
            ctx.checkpoint({"summaries": done})
            last_checkpoint = time.monotonic()
    by_method = {m: sum(1 for p in todo if p.get("method") == m) for m in ("model", "extractive")}
    return {"pages": pages, "summarized": len(todo), **by_method, "model_error": model_error}


def _model_summary(model: Any, title: str, paragraphs: list[str], sentences: int) -> str:
    text = "\n\n".join(paragraphs)[:MODEL_INPUT_CHARS]
    prompt = (
        f"Summarize the following web page in at most {sentences} sentences. "
        "Answer with the summary only.\n\n"
        f"Title: {title}\n\n{text}\n\nSummary:"
    )
    answer = call_model(model, prompt, max_tokens=60 * sentences, keys=ANSWER_KEYS)
    answer = " ".join(answer.split())
    if len(extractive.words(answer)) < 3:
        raise ValueError(f"model answered no usable summary: {answer[:80]!r}")
    return extractive._shorten(answer)
