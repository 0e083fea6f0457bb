"""Reading a request body safely: a size cap without buffering it all, and strict JSON."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request

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


def parse_json(raw: bytes) -> Any:
    """Strict JSON: no NaN/Infinity, finite numbers only, nesting at most MAX_JSON_DEPTH.

    Python's json accepts NaN and Infinity (not JSON) and raises RecursionError on deep
    nesting; both must be a 4xx, never a 500 or a stored non-finite number.
    """
    try:
        data = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise JsonTooDeep() from None
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
