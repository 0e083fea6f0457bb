"""Built-in `web` plugin: fetch many pages with conditional requests and content hashes.

Each page is saved under `pages/` in the workspace (written as `.part`, renamed
when complete). The per-page record is what the knowledge pipeline passes
along: later steps read the body by `path` and skip pages whose `state` says
the content did not change.
"""

from __future__ import annotations

import hashlib
import re
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from edgefleet.plugin_context import PluginContext
from edgefleet.pluginkit.actions import dispatch

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_CONCURRENCY = 4
CHUNK_BYTES = 64 * 1024
# Checkpoint at most this often (each one is a Redis write), and at the end.
CHECKPOINT_EVERY_S = 1.0
USER_AGENT = "edgefleet-web/1.0 (+knowledge-refresh)"
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class FetchError(RuntimeError):
    """No page could be fetched; the message lists why for the first few."""


class _PageFailed(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def run(ctx: PluginContext, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """Entry point named in plugin.yaml."""
    return dispatch(ctx, action, args, plugin="web", actions={"fetch_pages": fetch_pages})


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _check_url(url: Any) -> str:
    if not isinstance(url, str) or not url:
        raise ValueError("every entry of 'urls' must be a non-empty string")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ValueError(f"'urls' entries must be http:// or https:// URLs, got {url!r}")
    return url


def _file_name(index: int, url: str) -> str:
    segment = PurePosixPath(unquote(urlsplit(url).path)).name
    name = _UNSAFE_CHARS.sub("_", segment).strip("._")[:100] or "index"
    return f"pages/{index:04d}-{name}"


def fetch_pages(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    raw_urls = args.get("urls")
    if not isinstance(raw_urls, list) or not raw_urls:
        raise ValueError("'urls' must be a non-empty list of URLs")
    urls = list(dict.fromkeys(_check_url(u) for u in raw_urls))  # drop duplicates, keep order
    validators = args.get("validators") or {}
    if not isinstance(validators, dict):
        raise TypeError("'validators' must be an object mapping URL to {etag, last_modified, content_hash}")
    timeout = float(args.get("timeout", DEFAULT_TIMEOUT_S))
    max_bytes = int(args.get("max_bytes", DEFAULT_MAX_BYTES))
    concurrency = int(args.get("concurrency", DEFAULT_CONCURRENCY))
    if timeout <= 0:
        raise ValueError("'timeout' must be greater than 0")
    if max_bytes < 1:
        raise ValueError("'max_bytes' must be at least 1")
    if not 1 <= concurrency <= 16:
        raise ValueError("'concurrency' must be between 1 and 16")

    # A resumed attempt keeps what an earlier one finished (if its file is still here).
    done: dict[str, dict[str, Any]] = {}
    previous = ctx.resume()
    if isinstance(previous, dict) and isinstance(previous.get("pages"), dict):
        for url, record in previous["pages"].items():
            if url in urls and _still_valid(record):
                done[url] = record

    todo = [(i, url) for i, url in enumerate(urls) if url not in done]
    last_checkpoint = time.monotonic()
    headers = {"User-Agent": USER_AGENT}
    with (
        httpx.Client(follow_redirects=True, headers=headers, timeout=httpx.Timeout(timeout)) as client,
        ThreadPoolExecutor(max_workers=min(concurrency, max(1, len(todo)))) as pool,
    ):
        pending: dict[Future[dict[str, Any]], str] = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < concurrency:
                i, url = queue.pop(0)
                known = validators.get(url) if isinstance(validators.get(url), dict) else {}
                future = pool.submit(_fetch_one, ctx, client, i, url, known, timeout, max_bytes)
                pending[future] = url
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                url = pending.pop(future)
                done[url] = future.result()  # a cancel raises SubtaskCancelled here
            ctx.progress(len(done) / len(urls), f"{len(done)} of {len(urls)} pages")
            if time.monotonic() - last_checkpoint >= CHECKPOINT_EVERY_S and (queue or pending):
                ctx.checkpoint({"pages": done})
                last_checkpoint = time.monotonic()

    pages = [done[url] for url in urls]
    counts = {
        state: sum(1 for p in pages if p["state"] == state)
        for state in ("fetched", "not_modified", "same_content", "failed")
    }
    if counts["failed"] == len(pages):
        reasons = "; ".join(f"{p['url']}: {p['error']}" for p in pages[:3])
        raise FetchError(f"all {len(pages)} page(s) failed: {reasons}")
    ctx.progress(1.0, ", ".join(f"{n} {state}" for state, n in counts.items() if n))
    return {"pages": pages, **counts}


def _still_valid(record: Any) -> bool:
    if not isinstance(record, dict) or record.get("state") in (None, "failed"):
        return False
    path = record.get("path")
    return path is None or Path(path).is_file()


def _fetch_one(
    ctx: PluginContext,
    client: httpx.Client,
    index: int,
    url: str,
    known: dict[str, Any],
    timeout: float,
    max_bytes: int,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "url": url,
        "final_url": None,
        "state": "failed",
        "status": None,
        "path": None,
        "content_hash": None,
        "etag": None,
        "last_modified": None,
        "content_type": None,
        "bytes": 0,
        "fetched_at": now_iso(),
        "error": None,
    }
    request_headers = {}
    if known.get("etag"):
        request_headers["If-None-Match"] = str(known["etag"])
    if known.get("last_modified"):
        request_headers["If-Modified-Since"] = str(known["last_modified"])
    target = ctx.workspace_path(_file_name(index, url))
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.part")
    started = time.monotonic()
    try:
        ctx.check_cancelled()
        with client.stream("GET", url, headers=request_headers) as response:
            record["status"] = response.status_code
            record["final_url"] = str(response.url)
            record["etag"] = response.headers.get("etag") or known.get("etag")
            record["last_modified"] = response.headers.get("last-modified") or known.get("last_modified")
            record["content_type"] = response.headers.get("content-type")
            if response.status_code == 304:
                if not known:
                    raise _PageFailed("HTTP 304 to an unconditional request", 304)
                record.update(state="not_modified", content_hash=known.get("content_hash"))
                return record
            if response.status_code >= 400:
                raise _PageFailed(f"HTTP {response.status_code} {response.reason_phrase}".rstrip())
            digest, size = _save(ctx, response, part, max_bytes, started, timeout)
        part.replace(target)
    except _PageFailed as exc:
        part.unlink(missing_ok=True)
        record["error"] = str(exc)
        return record
    except httpx.TimeoutException:
        part.unlink(missing_ok=True)
        record["error"] = f"timed out (limit {timeout:g} s)"
        return record
    except httpx.HTTPError as exc:
        part.unlink(missing_ok=True)
        record["error"] = f"{type(exc).__name__}: {exc}"
        return record
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    content_hash = f"sha256:{digest}"
    if known.get("content_hash") == content_hash:
        # Same bytes as last time: nothing downstream needs the copy.
        target.unlink(missing_ok=True)
        record.update(state="same_content", content_hash=content_hash, bytes=size)
    else:
        record.update(state="fetched", content_hash=content_hash, bytes=size, path=str(target))
    return record


def _save(
    ctx: PluginContext,
    response: httpx.Response,
    part: Path,
    max_bytes: int,
    started: float,
    timeout: float,
) -> tuple[str, int]:
    length = response.headers.get("content-length")
    if length and not response.headers.get("content-encoding") and length.isdigit() and int(length) > max_bytes:
        raise _PageFailed(f"body of {length} bytes exceeds max_bytes={max_bytes}")
    digest = hashlib.sha256()
    size = 0
    with part.open("wb") as out:
        for chunk in response.iter_bytes(CHUNK_BYTES):
            ctx.check_cancelled()
            if time.monotonic() - started > timeout:
                raise httpx.ReadTimeout("download took too long")
            size += len(chunk)
            if size > max_bytes:
                raise _PageFailed(f"body exceeds max_bytes={max_bytes}")
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest(), size
