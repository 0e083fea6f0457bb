"""A job body from `edgefleet submit`'s arguments: a JSON/YAML file or stdin (bounded), and --input pairs."""

from __future__ import annotations

import json
import sys
from typing import Any

from edgefleet.cli.common import fail


def parse_inputs(pairs: list[str]) -> dict[str, Any]:
    """`--input` pairs as template inputs: `key=value` (a string) or `key:=<JSON>`."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            fail("--input", f"expected key=value or key:=<json>, got {pair!r}")
        value: Any = raw
        if key.endswith(":"):  # key:=<json>
            key = key[:-1]
            try:
                value = json.loads(raw)
            except ValueError as exc:
                fail(f"--input {key}", f"not valid JSON after ':=': {exc}")
        key = key.strip()
        if not key:
            fail("--input", f"empty input name in {pair!r}")
        values[key] = value
    return values


# A job file larger than this could not be sent anyway (the router's default body limit).
MAX_JOB_FILE_BYTES = 1_000_000


def _read_limited(file: str, limit: int) -> bytes:
    """At most `limit` + 1 bytes of the file (or stdin): enough to tell that it is too large."""
    if file == "-":
        return sys.stdin.buffer.read(limit + 1)
    with open(file, "rb") as handle:
        return handle.read(limit + 1)


def read_body(file: str) -> dict[str, Any]:
    """A job body from a JSON or YAML file, bounded: its size, and no YAML aliases (a "billion
    laughs" file expands a few hundred bytes into gigabytes) or nesting deep enough to crash."""
    from edgefleet.yaml_bounded import YamlRefused, load_bounded

    try:
        raw = _read_limited(file, MAX_JOB_FILE_BYTES)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(file, f"cannot read it: {exc.strerror if isinstance(exc, OSError) else exc}")
    if len(raw) > MAX_JOB_FILE_BYTES:
        fail(file, f"larger than {MAX_JOB_FILE_BYTES} bytes")
    try:
        body = json.loads(text)
    except RecursionError:
        fail(file, "nested too deeply")
    except ValueError:
        try:
            body = load_bounded(text)
        except YamlRefused as exc:
            fail(file, str(exc))
    if not isinstance(body, dict):
        fail(file, f"must hold a JSON/YAML object (steps or template), not {type(body).__name__}")
    return body


def read_batch(file: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, job body) from a JSON Lines file (or stdin): one JSON object per line, blank
    lines skipped. Every line is checked before anything is sent: a bad one exits 2 naming its line."""
    bodies: list[tuple[int, dict[str, Any]]] = []
    try:
        handle = sys.stdin.buffer if file == "-" else open(file, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        fail(file, f"cannot read it: {exc.strerror}")
    try:
        for number, raw in enumerate(handle, start=1):
            if len(raw) > MAX_JOB_FILE_BYTES:
                fail(f"{file}:{number}", f"a line longer than {MAX_JOB_FILE_BYTES} bytes")
            if not raw.strip():
                continue
            try:
                body = json.loads(raw)
            except RecursionError:
                fail(f"{file}:{number}", "nested too deeply")
            except ValueError as exc:
                fail(f"{file}:{number}", f"not valid JSON: {exc}")
            if not isinstance(body, dict):
                fail(f"{file}:{number}", f"must be a JSON object (a job body), not {type(body).__name__}")
            bodies.append((number, body))
    except OSError as exc:
        fail(file, f"cannot read it: {exc.strerror}")
    finally:
        if handle is not sys.stdin.buffer:
            handle.close()
    if not bodies:
        fail(file, "holds no job (one JSON job body per line)")
    return bodies
