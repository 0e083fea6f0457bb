"""Built-in `http_fetch` plugin: download one URL into the subtask's workspace."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from edgefleet.plugin_context import PluginContext

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
CHUNK_BYTES = 64 * 1024
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class FetchError(RuntimeError):
    """The download failed; the message says which URL and why."""


def run(ctx: PluginContext, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """Entry point named in plugin.yaml."""
    if action != "get":
        raise ValueError(f"http_fetch plugin has no action {action!r} (actions: get)")
    return _get(ctx, args)


def _check_url(url: Any) -> str:
    if not isinstance(url, str) or not url:
        raise ValueError("'url' must be a non-empty string")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ValueError(f"'url' must be an http:// or https:// URL, got {url!r}")
    return url


def default_filename(url: str) -> str:
    """A safe file name from the URL's last path segment, e.g. .../report.txt -> report.txt."""
    segment = PurePosixPath(unquote(urlsplit(url).path)).name
    name = _UNSAFE_CHARS.sub("_", segment).strip("._")
    return name[:200] or "download"


def _get(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    url = _check_url(args.get("url"))
    filename = str(args.get("filename") or default_filename(url))
    timeout = float(args.get("timeout", DEFAULT_TIMEOUT_S))
    max_bytes = int(args.get("max_bytes", DEFAULT_MAX_BYTES))
    if timeout <= 0:
        raise ValueError("'timeout' must be greater than 0")
    if max_bytes < 1:
        raise ValueError("'max_bytes' must be at least 1")

    target = ctx.workspace_path(filename)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed when complete: a failed or
    # cancelled download never leaves a half file that looks like a result.
    part = target.with_name(f".{target.name}.part")
    started = time.monotonic()

    def budget() -> float:
        # The whole download must fit in `timeout` and in the subtask's own deadline.
        return min(timeout - (time.monotonic() - started), ctx.time_left())

    try:
        with (
            httpx.Client(follow_redirects=True, timeout=httpx.Timeout(max(0.001, budget()))) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code >= 400:
                raise FetchError(f"GET {url} answered HTTP {response.status_code} {response.reason_phrase}".rstrip())
            expected = _content_length(response)
            if expected is not None and expected > max_bytes:
                raise FetchError(f"GET {url}: body of {expected} bytes exceeds max_bytes={max_bytes}")
            received = _save_body(ctx, response, part, url, max_bytes, expected, budget)
            status = response.status_code
            content_type = response.headers.get("content-type", "")
            final_url = str(response.url)
        part.replace(target)
    except httpx.TimeoutException:
        part.unlink(missing_ok=True)
        raise FetchError(f"GET {url}: timed out (limit {timeout:g} s)") from None
    except httpx.HTTPError as exc:
        part.unlink(missing_ok=True)
        raise FetchError(f"GET {url} failed: {type(exc).__name__}: {exc}") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    ctx.progress(1.0, f"{received} bytes")
    return {
        "path": str(target),
        "status": status,
        "bytes": received,
        "content_type": content_type,
        "url": final_url,
    }


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    # A compressed body's length says nothing about the decoded bytes we save.
    if value is None or response.headers.get("content-encoding"):
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _save_body(
    ctx: PluginContext,
    response: httpx.Response,
    part: Path,
    url: str,
    max_bytes: int,
    expected: int | None,
    budget: Callable[[], float],
) -> int:
    received = 0
    with part.open("wb") as out:
        for chunk in response.iter_bytes(CHUNK_BYTES):
            ctx.check_cancelled()
            if budget() <= 0:
                raise httpx.ReadTimeout("download took too long")
            received += len(chunk)
            if received > max_bytes:
                raise FetchError(f"GET {url}: body exceeds max_bytes={max_bytes}")
            out.write(chunk)
            if expected:
                ctx.progress(min(0.99, received / expected), f"{received} of {expected} bytes")
    return received
