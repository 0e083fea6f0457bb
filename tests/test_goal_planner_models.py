"""The model layer under the goal planner: broken streams, dropped connections, context overflow, route extra_body.

The OpenAI-compatible endpoints here are real HTTP servers on 127.0.0.1 that misbehave the way
servers do (a stream cut before its finish reason, a keep-alive connection dropped); the overflow
runs a real llama.cpp model (a tiny GGUF written by the test) with a context too small for the prompt.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from edgefleet.models.config import ModelsConfig
from edgefleet.models.errors import REASON_CONTEXT, ModelCallError, NoModelAvailable
from edgefleet.models.router import ModelRouter
from edgefleet.models.runtime import ModelPool
from tests.conftest import serving
from tests.model_fixtures import tiny_gguf

pytestmark = pytest.mark.skipif(importlib.util.find_spec("openai") is None, reason="needs the openai package")

MESSAGES = [{"role": "user", "content": "hi"}]


def _chunk(content: str | None, finish: str | None) -> bytes:
    body = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n".encode()


class Endpoint(BaseHTTPRequestHandler):
    """/v1/chat/completions; what it does is decided per server by `Endpoint.plan` (a list, one per request)."""

    protocol_version = "HTTP/1.1"
    plan: list[str]
    seen: list[dict[str, Any]]
    lock = threading.Lock()

    def log_message(self, *_: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.seen.append(body)
            what = self.plan.pop(0) if self.plan else "ok"
        if what == "drop":
            self.close_connection = True
            self.connection.shutdown(2)  # closed without an answer, as a dead keep-alive connection is
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        parts = [_chunk('{"a": ', None), _chunk("1}", None)]
        if what == "ok":
            parts.append(_chunk(None, "stop"))
        parts.append(b"data: [DONE]\n\n")
        for part in parts:
            self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")


def endpoint(plan: list[str]) -> type[Endpoint]:
    return type("Scripted", (Endpoint,), {"plan": list(plan), "seen": []})


def router_for(base_url: str, failures: int = 1, **route: Any) -> ModelRouter:
    config = ModelsConfig.parse(
        {
            "models": {"api": {"backend": "openai", "model": "m", "base_url": base_url, "extra_body": {"a": 1}}},
            "routes": {"planning": {"primary": "api", **route}},
            "circuit": {"failures": failures, "reset_after": 600},
        }
    )
    return ModelRouter(config, ModelPool(config))


def test_a_stream_without_a_finish_reason_is_an_error_and_the_next_call_is_fine() -> None:
    handler = endpoint(["cut", "ok"])
    with serving(handler) as url:
        models = router_for(f"{url}/v1", failures=3)
        with pytest.raises(NoModelAvailable, match="ended without a finish reason after 2 chunks"):
            models.complete("planning", MESSAGES)
        # The next, unrelated call through the same backend is answered (no stale pooled connection).
        answer = models.complete("planning", MESSAGES)
    assert answer.text == '{"a": 1}' and answer.finish_reason == "stop"


def test_a_dropped_connection_is_retried_once_on_a_fresh_one() -> None:
    handler = endpoint(["drop", "ok"])
    with serving(handler) as url:
        answer = router_for(f"{url}/v1").complete("planning", MESSAGES)
    assert answer.text == '{"a": 1}' and answer.fallbacks == []
    assert len(handler.seen) == 2  # the drop, then the retry
    handler = endpoint(["drop", "drop", "ok"])
    with serving(handler) as url, pytest.raises(NoModelAvailable, match="connection"):
        router_for(f"{url}/v1").complete("planning", MESSAGES)
    assert len(handler.seen) == 2  # one retry, not more


def test_a_route_extra_body_is_merged_over_the_model_s() -> None:
    handler = endpoint(["ok"])
    with serving(handler) as url:
        router_for(f"{url}/v1", extra_body={"repeat_penalty": 1.0, "a": 2}).complete("planning", MESSAGES)
    assert handler.seen[0]["repeat_penalty"] == 1.0 and handler.seen[0]["a"] == 2


@pytest.mark.model
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")
def test_a_context_overflow_never_opens_the_circuit(tmp_path: Path) -> None:
    config = ModelsConfig.parse(
        {
            "models": {
                "tiny": {"backend": "llama_cpp", "path": str(tiny_gguf(tmp_path / "t.gguf")), "context_size": 64}
            },
            "routes": {"planning": {"primary": "tiny"}},
            "circuit": {"failures": 1, "reset_after": 600},
        }
    )
    models = ModelRouter(config, ModelPool(config))
    long = [{"role": "user", "content": "word " * 200}]
    for _ in range(2):
        with pytest.raises(NoModelAvailable) as failed:
            models.complete("planning", long, max_tokens=8)
        assert [a.reason for a in failed.value.attempts] == [REASON_CONTEXT]
    assert models.circuit_state("tiny") == "closed"
    assert models.complete("planning", MESSAGES, max_tokens=4).model == "tiny"  # still called


def test_model_call_error_is_what_a_cut_stream_raises() -> None:
    # The backend's own error type, as a plugin calling a model through the worker sees it.
    handler = endpoint(["cut"])
    with serving(handler) as url:
        pool = ModelPool(router_for(f"{url}/v1").config)
        with pytest.raises(ModelCallError, match="finish reason"):
            pool.complete("api", MESSAGES)
