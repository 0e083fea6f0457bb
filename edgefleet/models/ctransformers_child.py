"""The child process of the ctransformers backend: loads one model file and answers JSON lines.

Run as ``python -m edgefleet.models.ctransformers_child`` by `CTransformersBackend` only. Its
bundled 2023 llama.cpp/ggml can crash on a file it misreads; in here that ends this process,
never the worker. Nothing but JSON crosses the pipes.

Requests on stdin, one JSON object a line::

    {"op": "load", "path", "model_type", "context_length", "threads", "gpu_layers"}
    {"op": "complete", "prompt", "max_new_tokens", "temperature", "top_k", "top_p",
     "repetition_penalty", "seed", "stop": [...]}

Answers on the original stdout, one JSON object a line::

    {"event": "loaded", "seconds", "context_length"}
    {"event": "token", "text"}                       (one per generated token, as it comes)
    {"event": "done", "tokens_in", "tokens_out", "finish_reason"}
    {"event": "error", "kind": "missing" | "load" | "context" | "call", "message"}

It exits at the end of stdin (the parent closed it, or died).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import resource
import sys
import time
from typing import IO, Any

MAX_REQUEST_BYTES = 4_000_000


def _send(out: IO[str], event: str, **fields: Any) -> None:
    out.write(json.dumps({"event": event, **fields}) + "\n")
    out.flush()


def _utf8_split(data: bytes) -> tuple[bytes, bytes]:
    """(the complete UTF-8 prefix, a trailing incomplete sequence) — a token may end mid-character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: look further back for the lead byte
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        if need > back:
            return data[:-back], data[-back:]
        break
    return data, b""


def _load(request: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    try:
        # By name: ctransformers ships no type hints, and may be absent where mypy runs.
        auto_model: Any = importlib.import_module("ctransformers").AutoModelForCausalLM
    except ImportError as exc:
        return None, {"kind": "missing", "message": f"ctransformers is not installed ({exc})"}
    kwargs: dict[str, Any] = {
        "model_type": str(request["model_type"]),
        "context_length": int(request.get("context_length") or -1),
        "gpu_layers": max(0, int(request.get("gpu_layers") or 0)),
        "local_files_only": True,
    }
    if request.get("threads"):
        kwargs["threads"] = int(request["threads"])
    try:
        llm = auto_model.from_pretrained(str(request["path"]), **kwargs)
    except Exception as exc:  # ctransformers raises RuntimeError/ValueError/OSError on a bad file
        return None, {"kind": "load", "message": f"{type(exc).__name__}: {exc}"}
    return llm, {}


def _complete(llm: Any, request: dict[str, Any], out: IO[str]) -> None:
    prompt = str(request.get("prompt") or "")
    stops = [str(s) for s in request.get("stop") or [] if s]
    tokens = llm.tokenize(prompt)
    context = int(llm.context_length)
    if len(tokens) >= context:
        _send(out, "error", kind="context", message=f"{len(tokens)} prompt tokens exceed context window of {context}")
        return
    limit = max(1, min(int(request.get("max_new_tokens") or 256), context - len(tokens)))
    stop_re = re.compile("|".join(map(re.escape, stops))) if stops else None
    text, sent, pending, count, finish = "", 0, b"", 0, "stop"
    sampling = {
        key: request[key]
        for key in ("temperature", "top_k", "top_p", "repetition_penalty", "seed")
        if request.get(key) is not None
    }
    for token in llm.generate(tokens, reset=True, **sampling):
        count += 1
        pending += llm.detokenize([token], decode=False)
        complete, pending = _utf8_split(pending)
        text += complete.decode(errors="replace")
        if stop_re is not None and (match := stop_re.search(text)):
            text = text[: match.start()]
            break
        # Hold back a tail that could still become a stop sequence with the next token.
        hold = max((i for s in stops for i in range(len(s), 0, -1) if text.endswith(s[:i])), default=0)
        if len(text) - hold > sent:
            _send(out, "token", text=text[sent : len(text) - hold])
            sent = len(text) - hold
        if count >= limit:
            finish = "length"
            break
    if len(text) > sent:
        _send(out, "token", text=text[sent:])
    _send(out, "done", tokens_in=len(tokens), tokens_out=count, finish_reason=finish)


def main() -> int:
    # The protocol keeps the real stdout; fd 1 then points at stderr, so that what the C library
    # prints can never be mistaken for an answer.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    # A crash is expected and reported by the parent: no core file (a model's size) left behind.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    llm: Any = None
    for line in sys.stdin:
        if len(line) > MAX_REQUEST_BYTES:
            _send(out, "error", kind="call", message="request too large")
            continue
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            _send(out, "error", kind="call", message=f"bad request: {exc}")
            continue
        op = request.get("op")
        if op == "load":
            started = time.perf_counter()
            llm, error = _load(request)
            if error:
                _send(out, "error", **error)
            else:
                _send(out, "loaded", seconds=time.perf_counter() - started, context_length=int(llm.context_length))
        elif op == "complete":
            if llm is None:
                _send(out, "error", kind="call", message="no model loaded")
                continue
            try:
                _complete(llm, request, out)
            except Exception as exc:
                _send(out, "error", kind="call", message=f"{type(exc).__name__}: {exc}")
        else:
            _send(out, "error", kind="call", message=f"unknown op {op!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
