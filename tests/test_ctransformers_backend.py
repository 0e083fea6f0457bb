"""The optional `ctransformers` backend: a model in a child process, crash-isolated, with fallback.

Real files, real processes: a tiny llama GGUF written with the `gguf` package (with tokenizer
scores, which ctransformers' 2023 llama.cpp needs) loads and generates; the same file cut inside
its header makes ctransformers crash (SIGSEGV, at times SIGABRT) while loading, and SmolLM2 (a
current GGUF) is a file it cannot load. Each of those fails its one call; the route's llama_cpp
model answers. (A file cut inside its weights crashes too, but at a random point: in a call or
only at exit. A crash in the middle of a call is made exact with a real SIGSEGV instead.)
A GGML-era GPT-2 file (the unversioned `ggml` format, written here) is what ctransformers is
for: today's llama.cpp refuses it, ctransformers serves it.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import signal
import struct
import termios
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgefleet.models import ModelError, ModelPool, ModelRouter, ModelsConfig, ModelsConfigError, ModelTimeout
from edgefleet.models.backends import Completion, make_backend
from edgefleet.models.ctransformers_backend import CTransformersBackend, describe_exit, render_prompt
from tests.conftest import Cluster, wait_until
from tests.model_fixtures import smollm2_path, tiny_gguf

HAVE_CTRANSFORMERS = importlib.util.find_spec("ctransformers") is not None
HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_ctransformers = pytest.mark.skipif(
    not HAVE_CTRANSFORMERS, reason="ctransformers is not installed (pip install 'edgefleet[ctransformers]')"
)
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="llama_cpp cannot be imported (deploy/install_llama.sh)")
HELLO = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ct")
    tiny = tiny_gguf(folder / "tiny.gguf")
    data = tiny.read_bytes()
    # Cut in the key-value header: ggml gives up reading it and then crashes while loading.
    (folder / "cut-header.gguf").write_bytes(data[:4000])
    return {"tiny": tiny, "cut_header": folder / "cut-header.gguf"}


def ggml_gpt2(path: Path, *, n_ctx: int = 128, n_embd: int = 32, n_head: int = 4, n_layer: int = 2) -> Path:
    """A tiny random-weight GPT-2 in the 2023 GGML format of ggml's gpt-2 example (f32, no version).

    Layout: magic "ggml", hparams (n_vocab, n_ctx, n_embd, n_head, n_layer, ftype), the vocabulary
    (length-prefixed strings), then each tensor: n_dims, name length, type, ne[...], name, data.
    """
    import numpy as np

    vocab = list(dict.fromkeys([chr(c) for c in range(32, 127)] + ["hello", " hello", " world", "\n", "User", ":"]))
    rng = np.random.default_rng(0)
    with open(path, "wb") as out:
        out.write(struct.pack("<I", 0x67676D6C))
        out.write(struct.pack("<6i", len(vocab), n_ctx, n_embd, n_head, n_layer, 0))
        out.write(struct.pack("<i", len(vocab)))
        for piece in vocab:
            out.write(struct.pack("<I", len(piece.encode())) + piece.encode())

        def tensor(name: str, *ne: int, fill: float | None = None) -> None:
            shape = tuple(reversed(ne))  # ggml's ne[0] is the fastest-moving dimension
            data = np.full(shape, fill, np.float32) if fill is not None else rng.standard_normal(shape) * 0.05
            out.write(struct.pack(f"<3i{len(ne)}i", len(ne), len(name), 0, *ne) + name.encode())
            out.write(data.astype(np.float32).tobytes())

        tensor("model/ln_f/g", n_embd, fill=1.0)
        tensor("model/ln_f/b", n_embd, fill=0.0)
        tensor("model/wte", n_embd, len(vocab))
        tensor("model/wpe", n_embd, n_ctx)
        tensor("model/lm_head", n_embd, len(vocab))
        for i in range(n_layer):
            block = f"model/h{i}/"
            for norm in ("ln_1", "ln_2"):
                tensor(f"{block}{norm}/g", n_embd, fill=1.0)
                tensor(f"{block}{norm}/b", n_embd, fill=0.0)
            for layer, n_in, n_out in (
                ("attn/c_attn", n_embd, 3 * n_embd),
                ("attn/c_proj", n_embd, n_embd),
                ("mlp/c_fc", n_embd, 4 * n_embd),
                ("mlp/c_proj", 4 * n_embd, n_embd),
            ):
                tensor(f"{block}{layer}/w", n_in, n_out)
                tensor(f"{block}{layer}/b", n_out, fill=0.0)
    return path


def _config(files: dict[str, Path], **routes: Any) -> ModelsConfig:
    # One thread each: ggml's worker threads spin, and crawl on a box shared with other tests.
    ct = {"backend": "ctransformers", "model_type": "llama", "threads": 1}
    models: dict[str, Any] = {
        "ct": {**ct, "path": str(files["tiny"]), "chat_format": "chatml"},
        "ct_cut_header": {**ct, "path": str(files["cut_header"])},
        "local": {"backend": "llama_cpp", "path": str(files["tiny"]), "threads": 1},
    }
    smollm2 = smollm2_path()
    if smollm2 is not None:
        models["ct_smollm2"] = {**ct, "path": str(smollm2)}
    return ModelsConfig.parse({"models": models, "routes": routes})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_models_file_names_what_a_ctransformers_model_lacks() -> None:
    with pytest.raises(ModelsConfigError) as missing:
        ModelsConfig.parse({"models": {"old": {"backend": "ctransformers", "path": "/m/old.bin"}}})
    assert missing.value.errors == [
        "models.old.model_type: required when backend is 'ctransformers' (e.g. llama, gpt2)"
    ]
    with pytest.raises(ModelsConfigError) as stray:
        ModelsConfig.parse({"models": {"m": {"backend": "llama_cpp", "path": "/m/x.gguf", "model_type": "llama"}}})
    assert stray.value.errors == ["models.m.model_type: only for backend 'ctransformers'"]
    with pytest.raises(ModelsConfigError) as fmt:
        ModelsConfig.parse(
            {
                "models": {
                    "m": {"backend": "ctransformers", "path": "/m/x.bin", "model_type": "gpt2", "chat_format": "x"}
                }
            }
        )
    assert fmt.value.errors == ["models.m.chat_format: for ctransformers one of plain, chatml"]
    spec = ModelsConfig.parse(
        {"models": {"m": {"backend": "ctransformers", "path": "/m/x.bin", "model_type": "gpt2"}}}
    ).models["m"]
    assert isinstance(make_backend(spec), CTransformersBackend)
    assert spec.resolved_path() == Path("/m/x.bin")
    prompt, stops = render_prompt([{"role": "system", "content": "Be brief."}, *HELLO], "chatml")
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_end|>" in stops
    assert describe_exit(-signal.SIGSEGV) == "killed by signal SIGSEGV"


@needs_ctransformers
def test_a_tiny_gguf_loads_and_generates_in_a_child_without_the_workers_secrets(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "ef-secret-token-that-must-stay-here"
    monkeypatch.setenv("EDGEFLEET_TOKEN", secret)
    pool = ModelPool(_config(files))
    try:
        assert "ct" in pool.available()
        first = pool.complete("ct", HELLO, max_tokens=6)
        backend = pool._backend("ct")
        assert isinstance(backend, CTransformersBackend)
        pid = backend.pid
        assert pid is not None and pid != os.getpid()
        assert first.backend == "ctransformers" and first.model == "ct"
        assert first.load_seconds > 0 and first.tokens_in > 0
        assert 1 <= first.tokens_out <= 6 and first.finish_reason in ("stop", "length")
        assert first.text  # streamed token by token from the child
        assert first.first_token_seconds is not None and first.first_token_seconds <= first.seconds
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert secret.encode() not in environ and b"EDGEFLEET_TOKEN" not in environ

        # Warm: same child, no load, and greedy decoding gives the same answer.
        second = pool.complete("ct", HELLO, max_tokens=6)
        assert backend.pid == pid and second.load_seconds == 0.0
        assert second.text == first.text and second.tokens_out == first.tokens_out
    finally:
        pool.close()
    wait_until(lambda: not _alive(pid), 10, what="the child to exit when the model is unloaded")


@needs_ctransformers
@needs_llama
@pytest.mark.model
def test_a_crashing_or_unreadable_file_fails_its_call_and_the_route_falls_back(files: dict[str, Path]) -> None:
    config = _config(files)
    chain = ["ct_cut_header", *(["ct_smollm2"] if "ct_smollm2" in config.models else [])]
    config = _config(files, summarize={"primary": chain[0], "fallbacks": [*chain[1:], "local"]})
    router = ModelRouter(config, ModelPool(config))
    try:
        answer = router.complete("summarize", HELLO, max_tokens=4)
        assert answer.model == "local" and answer.backend == "llama_cpp"
        assert [(a.model, a.reason) for a in answer.fallbacks] == [(name, "error") for name in chain]
        details = {a.model: a.detail for a in answer.fallbacks}
        assert "could not load" in details["ct_cut_header"] and "killed by signal SIG" in details["ct_cut_header"]
        if "ct_smollm2" in details:
            assert "could not load" in details["ct_smollm2"] and "Failed to create LLM" in details["ct_smollm2"]

        # The crashed model is not left half-alive: the next call starts a fresh child and fails the same way.
        with pytest.raises(ModelError) as again:
            router.pool.complete("ct_cut_header", HELLO, max_tokens=4)
        assert again.value.model == "ct_cut_header" and "killed by signal SIG" in again.value.detail
        assert router.pool.loaded() == ["local"]
    finally:
        router.pool.close()


def _state(pid: int) -> str:
    """The process state letter of /proc/<pid>/stat (T: stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _unread_request_bytes(pid: int) -> int:
    """Bytes waiting in the child's stdin pipe (its read end, opened through /proc)."""
    fd = os.open(f"/proc/{pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
    finally:
        os.close(fd)


@needs_ctransformers
def test_a_crash_in_the_middle_of_a_call_fails_that_call_and_the_next_one_gets_a_new_child(
    files: dict[str, Path],
) -> None:
    pool = ModelPool(_config(files))
    try:
        pool.load("ct")
        backend = pool._backend("ct")
        assert isinstance(backend, CTransformersBackend)
        pid = backend.pid
        assert pid is not None
        # Stopped, the child cannot answer: the call is surely in flight when the segfault lands.
        # Only once it has really stopped: on a loaded box a child still waking from its read could
        # take the request in before it stops, and the pipe would never show it.
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: _state(pid) == "T", 30, what="the child to stop")
        outcome: list[BaseException | Completion] = []

        def call() -> None:
            try:
                outcome.append(pool.complete("ct", HELLO, max_tokens=8))
            except BaseException as exc:
                outcome.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        try:
            wait_until(lambda: _unread_request_bytes(pid) > 0, 30, what="the request to reach the child")
        finally:
            os.kill(pid, signal.SIGSEGV)
            os.kill(pid, signal.SIGCONT)
        caller.join(60)
        assert len(outcome) == 1 and isinstance(outcome[0], ModelError), outcome
        error = outcome[0]
        assert error.model == "ct" and error.reason == "error"
        assert "died while generating (killed by signal SIGSEGV" in error.detail
        assert not backend.loaded

        answer = pool.complete("ct", HELLO, max_tokens=4)
        assert answer.load_seconds > 0 and backend.pid not in (None, pid)
    finally:
        pool.close()


@needs_ctransformers
def test_a_timeout_stops_the_child_and_the_next_call_starts_a_new_one(files: dict[str, Path]) -> None:
    pool = ModelPool(_config(files))
    try:
        pool.load("ct")
        backend = pool._backend("ct")
        assert isinstance(backend, CTransformersBackend)
        old = backend.pid
        assert old is not None
        with pytest.raises(ModelTimeout):
            backend.complete(HELLO, max_tokens=64, timeout=1e-9)
        assert not backend.loaded and not _alive(old)  # killed and reaped
        answer = pool.complete("ct", HELLO, max_tokens=3)
        assert answer.load_seconds > 0 and backend.pid not in (None, old)
    finally:
        pool.close()


@needs_ctransformers
@needs_llama
@pytest.mark.model
def test_a_schema_call_skips_ctransformers_without_opening_its_circuit(files: dict[str, Path]) -> None:
    config = _config(files, planning={"primary": "ct", "fallback": "local"})
    router = ModelRouter(config, ModelPool(config))
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    try:
        for _ in range(config.circuit.failures + 1):
            answer = router.complete("planning", HELLO, max_tokens=16, json_schema=schema)
            assert answer.model == "local"
            assert [(a.model, a.reason) for a in answer.fallbacks] == [("ct", "config")]
            assert "JSON schema" in answer.fallbacks[0].detail
        assert router.circuit_state("ct") == "closed"
    finally:
        router.pool.close()


@needs_ctransformers
@needs_llama
@pytest.mark.model
def test_a_ggml_era_gpt2_file_that_llama_cpp_refuses_is_served_by_ctransformers(tmp_path: Path) -> None:
    old = ggml_gpt2(tmp_path / "gpt2-ggml.bin")
    config = ModelsConfig.parse(
        {
            "models": {
                "today": {"backend": "llama_cpp", "path": str(old)},
                "old": {"backend": "ctransformers", "path": str(old), "model_type": "gpt2", "threads": 1},
            },
            "routes": {"generate": {"primary": "today", "fallback": "old"}},
        }
    )
    router = ModelRouter(config, ModelPool(config))
    try:
        answer = router.complete("generate", HELLO, max_tokens=5)
        assert answer.model == "old" and answer.backend == "ctransformers"
        assert [(a.model, a.reason) for a in answer.fallbacks] == [("today", "error")]
        assert "could not load" in answer.fallbacks[0].detail
        assert answer.tokens_in > 0 and 1 <= answer.tokens_out <= 5 and answer.first_token_seconds is not None
    finally:
        router.pool.close()


@needs_ctransformers
@needs_llama
@pytest.mark.model
@pytest.mark.cluster
def test_on_a_real_worker_a_crashing_model_fails_over_and_the_worker_lives_on(
    files: dict[str, Path], cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n"
        f"  crashy: {{backend: ctransformers, path: {files['cut_header']}, model_type: llama, threads: 1}}\n"
        f"  local: {{backend: llama_cpp, path: {files['tiny']}, threads: 1}}\n"
        "routes:\n"
        "  summarize: {primary: crashy, fallback: local}\n"
    )
    cluster = cluster_factory(EDGEFLEET_MODELS_FILE=str(models), EDGEFLEET_CPU_CONCURRENCY="1")
    cluster.start_router()
    node = cluster.start_node("n1", classes="cpu")
    cluster.wait_nodes_ready("n1")
    step = {"id": "sum", "plugin": "llm", "action": "summarize", "args": {"text": "hello world", "max_tokens": 16}}
    outputs = []
    for _ in range(2):
        done = cluster.wait_job(cluster.submit({"steps": [step]})["id"], timeout=120)
        assert done["state"] == "succeeded", done
        assert done["subtasks"][0]["attempt"] == 1  # the subtask never lost its worker
        outputs.append(done["subtasks"][0]["output"])
    for out in outputs:
        # Each call crashed a ctransformers child (a new one each time) and fell back.
        assert out["model"] == "local" and out["fell_back_from"] == [["crashy", "error"]]
    # One worker process (concurrency 1) served both: its llama_cpp model was still warm.
    assert outputs[0]["load_seconds"] > 0 and outputs[1]["load_seconds"] == 0
    assert node.poll() is None
