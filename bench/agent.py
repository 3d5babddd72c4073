"""Benchmark the batched agent engine on a real model; prints the ratios measured in one run.

1. Batching: episodes/s and generated tokens/s of ``run_agent`` on all questions at once, against a
   sequential loop that runs the same questions one at a time (same backend, model, config).
   Target: batched / sequential >= 3.
2. Engine efficiency: generated tokens/s of the batched agent run (wall clock, sandbox and bookkeeping
   included), divided by the tokens/s of the bare backend replaying exactly the same generate calls
   (same requests, same batch shapes, greedy, so the same tokens). Target: >= 0.8.

Questions are generated arithmetic ("What is 4821 * 37?"), so the run needs no dataset. Both modes run
with the same torch thread count (default 1: on a CPU shared with other jobs, more threads spin-wait).

    python bench/agent.py --questions 16 --max-steps 2
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script from anywhere: the project root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent_runtime.engine import AgentConfig, AgentTask, Episode, run_agent
from agent_runtime.generation import Generation, Generator, Request, Sampling

BATCHING_TARGET = 3.0
EFFICIENCY_TARGET = 0.8


def arithmetic_tasks(count: int, seed: int = 0) -> list[AgentTask]:
    """``count`` arithmetic questions with distinct ids, reproducible from ``seed``."""
    rng = random.Random(seed)
    tasks = []
    for i in range(count):
        a, b = rng.randint(100, 99999), rng.randint(10, 999)
        op = rng.choice(["*", "+", "-"])
        tasks.append(AgentTask(question_id=f"arith-{i}", question=f"What is {a} {op} {b}?"))
    return tasks


@dataclass
class RecordingGenerator:
    """Passes calls through to ``inner`` and keeps them, so they can be replayed on the bare backend."""

    inner: Generator
    calls: list[tuple[list[Request], Sampling]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.inner.name

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Generation]:
        self.calls.append((list(requests), sampling))
        return self.inner.generate(requests, sampling)

    def close(self) -> None:
        self.inner.close()


def generated_tokens(episodes: list[Episode]) -> int:
    return sum(e.completion_tokens for e in episodes)


def timed_agent(tasks: list[AgentTask], generator, sandbox, cfg: AgentConfig, batched: bool):
    """Run the tasks all at once or one at a time; returns (episodes, wall seconds)."""
    start = time.perf_counter()
    if batched:
        episodes = run_agent(tasks, generator, sandbox, cfg)
    else:
        episodes = [episode for task in tasks for episode in run_agent([task], generator, sandbox, cfg)]
    return episodes, time.perf_counter() - start


def replay(generator: Generator, calls: list[tuple[list[Request], Sampling]]) -> tuple[int, float]:
    """Re-issue recorded calls on the bare backend; returns (generated tokens, wall seconds)."""
    tokens = 0
    start = time.perf_counter()
    for requests, sampling in calls:
        for generation in generator.generate(requests, sampling):
            tokens += sum(c.completion_tokens for c in generation.completions)
    return tokens, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model spec for the transformers backend")
    parser.add_argument("--questions", type=int, default=16, help="number of arithmetic questions (>= 16)")
    parser.add_argument("--max-steps", type=int, default=2, help="agent steps before the finalising call")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="token limit of one action")
    parser.add_argument("--prompt", choices=["teacher", "student"], default="student", help="system prompt")
    parser.add_argument("--repeats", type=int, default=2, help="(batched run, bare replay) pairs; the fastest counts")
    # On a CPU shared with other jobs, torch's spin-waiting threads slow it down ~10x; one thread does not.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/agent.json"), help="where to write results")
    args = parser.parse_args(argv)
    if args.questions < 16:
        parser.error("--questions must be at least 16 for the batching comparison to mean anything")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    cfg = AgentConfig(max_steps=args.max_steps, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    results = measure(arithmetic_tasks(args.questions), args.model, cfg, args.repeats)
    _report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"written {args.out}")
    return 0


def measure(tasks: list[AgentTask], model: str, cfg: AgentConfig, repeats: int) -> dict:
    """Time the sequential loop once, then ``repeats`` interleaved (batched run, bare replay) pairs.

    Interleaving and keeping the fastest of each cancels most of the drift of a shared machine's load.
    """
    from agent_runtime.backends import BackendConfig, make_generator
    from agent_runtime.sandbox import Sandbox, SandboxConfig

    backend = make_generator(BackendConfig(kind="transformers", model=model))
    agent_s, replay_s = [], []
    with Sandbox(SandboxConfig(workers=2)) as sandbox:
        run_agent(tasks[:2], backend, sandbox, cfg.model_copy(update={"max_steps": 1}))  # warm up both
        sequential, sequential_s = timed_agent(tasks, backend, sandbox, cfg, batched=False)
        print(f"sequential run: {sequential_s:.1f} s", flush=True)
        for _ in range(repeats):
            recorder = RecordingGenerator(backend)
            batched, seconds = timed_agent(tasks, recorder, sandbox, cfg, batched=True)
            replay_tokens, replay_seconds = replay(backend, recorder.calls)
            agent_s.append(seconds)
            replay_s.append(replay_seconds)
            print(f"batched run: {seconds:.1f} s, bare replay: {replay_seconds:.1f} s", flush=True)
    backend.close()
    n, tokens = len(tasks), generated_tokens(batched)
    results = {
        "model": model,
        "questions": n,
        "config": cfg.model_dump(),
        "sequential": {"seconds": sequential_s, "episodes_per_s": n / sequential_s,
                       "tokens_per_s": generated_tokens(sequential) / sequential_s,
                       "tokens": generated_tokens(sequential), "steps": sum(e.num_steps for e in sequential)},
        "batched": {"seconds": min(agent_s), "all_seconds": agent_s, "episodes_per_s": n / min(agent_s),
                    "tokens_per_s": tokens / min(agent_s), "tokens": tokens,
                    "steps": sum(e.num_steps for e in batched), "backend_calls": len(recorder.calls)},
        "bare_backend": {"seconds": min(replay_s), "all_seconds": replay_s, "tokens": replay_tokens,
                         "tokens_per_s": replay_tokens / min(replay_s)},
        "answered": sum(e.prediction is not None for e in batched),
    }
    results["episodes_per_s_ratio"] = results["batched"]["episodes_per_s"] / results["sequential"]["episodes_per_s"]
    results["tokens_per_s_ratio"] = results["batched"]["tokens_per_s"] / results["sequential"]["tokens_per_s"]
    results["engine_efficiency"] = results["batched"]["tokens_per_s"] / results["bare_backend"]["tokens_per_s"]
    return results


def _verdict(ok: bool) -> str:
    return "ok" if ok else "BELOW TARGET"


def _report(r: dict) -> None:
    print(f"{r['questions']} questions, model {r['model']}, {r['batched']['backend_calls']} batched backend calls")
    for mode in ("sequential", "batched"):
        m = r[mode]
        print(f"  {mode:<10} {m['seconds']:8.1f} s  {m['episodes_per_s']:7.3f} episodes/s  "
              f"{m['tokens_per_s']:8.1f} tokens/s  ({m['tokens']} tokens, {m['steps']} steps)")
    b = r["bare_backend"]
    print(f"  bare replay {b['seconds']:7.1f} s  {b['tokens_per_s']:8.1f} tokens/s  ({b['tokens']} tokens)")
    print(f"episodes/s ratio  {r['episodes_per_s_ratio']:.2f}  (target >= {BATCHING_TARGET}: "
          f"{_verdict(r['episodes_per_s_ratio'] >= BATCHING_TARGET)})")
    print(f"tokens/s ratio    {r['tokens_per_s_ratio']:.2f}  (target >= {BATCHING_TARGET}: "
          f"{_verdict(r['tokens_per_s_ratio'] >= BATCHING_TARGET)})")
    print(f"engine efficiency {r['engine_efficiency']:.2f}  (target >= {EFFICIENCY_TARGET}: "
          f"{_verdict(r['engine_efficiency'] >= EFFICIENCY_TARGET)})")
    print(f"answered {r['answered']}/{r['questions']} (batched run)")


if __name__ == "__main__":
    raise SystemExit(main())
