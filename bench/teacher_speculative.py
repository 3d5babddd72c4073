"""Does speculative decoding speed up the 1.5B teacher on this CPU? One setting per run.

Runs the teacher bench's agent episodes (arithmetic, full teacher prompt, 2 steps, 128-token actions,
greedy) on an xllamacpp server with one slot, started here with one of:

- ``none``: plain decoding (the project's ``llamacpp`` backend, less the shared-prefix slot copy);
- ``draft``: speculative decoding with the Qwen2.5-Coder-0.5B student as the draft model (``--draft-max``
  tokens drafted per step);
- ``ngram``: n-gram drafting from the context (``COMMON_SPECULATIVE_TYPE_NGRAM_MOD``, no draft model).

and prints wall time, episodes/s and the server's own counters (prompt and decode seconds, drafted and
accepted tokens). On a 2-core AVX2 CPU both phases are compute-bound, so verifying a batch of drafted
tokens costs about as much as decoding them, and ``draft`` is slower than ``none``::

    python bench/teacher_speculative.py --spec none
    python bench/teacher_speculative.py --spec draft
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.agent import arithmetic_tasks, generated_tokens


def server_params(spec: str, port: int, draft_max: int):
    """The project's llama.cpp server settings for the teacher (one slot), plus the speculative ones."""
    import xllamacpp as xlc

    from agent_runtime.backends.llamacpp_backend import gguf_path
    from agent_runtime.backends.llamacpp_server import build_params

    params = build_params(argparse.Namespace(
        model=str(gguf_path("qwen2.5-coder-1.5b-instruct")), alias="teacher", host="127.0.0.1", port=port,
        slots=1, ctx_per_slot=4096, threads=2, poll=50, cache_ram_mib=2048, slot_save_path=None, quiet=True,
        lora=None))
    kinds = xlc.common_speculative_type
    if spec == "draft":
        params.speculative.types = [kinds.COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE]
        draft = params.speculative.draft
        draft.mparams.path = str(gguf_path("qwen2.5-coder-0.5b-instruct"))
        draft.n_max, draft.n_min = draft_max, 0
        draft.cpuparams.n_threads = draft.cpuparams_batch.n_threads = 2
    elif spec == "ngram":
        params.speculative.types = [kinds.COMMON_SPECULATIVE_TYPE_NGRAM_MOD]
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", choices=["none", "draft", "ngram"], default="none")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--draft-max", type=int, default=8)
    parser.add_argument("--port", type=int, default=18123)
    args = parser.parse_args(argv)

    import httpx
    import xllamacpp as xlc

    from agent_runtime.backends import BackendConfig
    from agent_runtime.backends.llamacpp_backend import server_counters
    from agent_runtime.backends.openai_backend import OpenAIGenerator
    from agent_runtime.engine import AgentConfig, run_agent
    from agent_runtime.sandbox import Sandbox, SandboxConfig

    server = xlc.Server(server_params(args.spec, args.port, args.draft_max))
    base = f"http://127.0.0.1:{args.port}"
    generator = OpenAIGenerator(BackendConfig(kind="openai", model="teacher", base_url=f"{base}/v1", concurrency=1,
                                              timeout_s=900), continue_mode="prefill")
    tasks = arithmetic_tasks(args.questions)
    with Sandbox(SandboxConfig(workers=2)) as sandbox:
        start = time.perf_counter()
        episodes = run_agent(tasks, generator, sandbox, AgentConfig(prompt="teacher", max_steps=2, max_new_tokens=128))
        seconds = time.perf_counter() - start
    counters = server_counters(httpx.get(f"{base}/metrics", timeout=10).text)
    del server
    tokens = generated_tokens(episodes)
    print(json.dumps({"spec": args.spec, "seconds": round(seconds, 1), "episodes_per_s": round(len(tasks) / seconds, 4),
                      "tokens": tokens, "answered": sum(e.prediction is not None for e in episodes)}))
    for name in ("prompt_tokens_total", "prompt_seconds_total", "tokens_predicted_total",
                 "tokens_predicted_seconds_total", "spec_decode_num_draft_tokens_total",
                 "spec_decode_num_accepted_tokens_total"):
        print(f"{name:<40} {counters.get(name, float('nan')):10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
