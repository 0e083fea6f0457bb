"""Reading a request body safely: JSON by its Content-Type, a size cap without buffering it all, strict JSON."""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any

import orjson
from fastapi import Depends, HTTPException, Request

MAX_JSON_DEPTH = 64


class JsonTooDeep(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


# orjson reads integers beyond 64 bits as floats; a body with such a run of digits takes the
# stdlib parser, which keeps them exact.
_LONG_DIGITS = re.compile(rb"\d{19,}")


def _parse_stdlib(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise JsonTooDeep() from None


def parse_json(raw: bytes) -> Any:
    """Strict JSON: no NaN/Infinity, finite numbers only, nesting at most MAX_JSON_DEPTH.

    orjson (several times faster) reads the bodies that are plain JSON; what it refuses is read
    again by the stdlib parser, so that a bad body gets the same clear reason as before. Python's
    json accepts NaN and Infinity (not JSON) and raises RecursionError on deep nesting; both must
    be a 4xx, never a 500 or a stored non-finite number.
    """
    if _LONG_DIGITS.search(raw):
        data = _parse_stdlib(raw)
    else:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = _parse_stdlib(raw)
    stack = [(data, 1)]
    while stack:  # iterative, so that the check itself cannot overflow the stack
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise JsonTooDeep()
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return data


async def read_limited_body(request: Request, limit: int) -> bytes | None:
    """Read at most `limit` bytes; None when the body is larger (without buffering it all)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


# application/json or a structured-syntax type such as application/problem+json (RFC 6839).
_JSON_MEDIA_TYPE = re.compile(r"application/(?:[a-z0-9!#$&^_.-]+\+)?json")


def content_type_problem(content_type: str | None) -> str | None:
    """Why a body sent with this Content-Type is not read as JSON, or None when it is.

    A body that says it is text/plain or a form is refused rather than guessed at, and
    JSON is UTF-8 (RFC 8259), so another charset is refused too.
    """
    if not content_type:
        return "missing; send the body as application/json"
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if not _JSON_MEDIA_TYPE.fullmatch(media):
        return f"{media[:100]!r} is not accepted; send the body as application/json"
    for param in params.split(";"):
        name, _, value = param.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            return f"charset {charset[:40]!r} is not accepted; JSON is UTF-8"
    return None


def require_json(request: Request) -> None:
    """FastAPI dependency of the routes that take a JSON body: a body of another type is a 415."""
    has_body = request.headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in request.headers
    problem = content_type_problem(request.headers.get("content-type")) if has_body else None
    if problem:
        raise HTTPException(415, detail=[{"field": "Content-Type", "reason": problem}])


# Declared after the principal in a route's parameters, so that a request without a token is a 401
# before it is a 415.
JsonBody = Annotated[None, Depends(require_json)]
