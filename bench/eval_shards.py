"""Benchmark sharded evaluation: 2 shards on 2 cores against 1 shard, same questions, one run.

Both runs go through the real ``evaluate`` flow (Prefect, FAISS retrieval, sandbox, SmolLM2-135M on the
transformers backend) with ``evaluate.runner: processes``: every shard is its own Python process with
``cores // max_workers`` torch threads. The 1-shard run is one process using every core; the 2-shard
run is two processes with one thread each. Both runs must evaluate the same questions once each
(checked); decoding is greedy, so their predictions agree up to the float noise of different batch
compositions (the agreement is printed). Target: speed-up >= 1.6.

The index is a small corpus written here and built before the timing (retrieval is not what is
measured); both evaluations live in one temporary artifact home and differ only in their shard settings.

    python bench/eval_shards.py --questions 16 --max-steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Run as a script from anywhere: the project root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET = 1.6
CORPUS = [
    ("Arithmetic", ("Arithmetic is the branch of mathematics that studies addition, subtraction, "
                    "multiplication and division of numbers.")),
    ("Percentage", "A percentage is a number expressed as a fraction of 100; 20% of 50 is 10."),
    ("Interest", "Simple interest is the principal multiplied by the rate and the number of periods."),
    ("Average", "The arithmetic mean of a list of numbers is their sum divided by how many there are."),
    ("Python", "Python is a programming language whose interpreter evaluates arithmetic expressions."),
]


def config(corpus: Path, questions: int, max_steps: int, max_new_tokens: int, shards: int):
    from flows.config import PipelineConfig

    return PipelineConfig.model_validate({
        "index": {"corpus": {"source": str(corpus)}},
        "sandbox": {"workers": 2},
        "evaluate": {
            "datasets": [{"name": "arith", "source": "builtin:arith", "split": "test", "kind": "math",
                          "num_questions": questions}],
            "methods": [{"name": "agent", "model": "student", "mode": "agent", "prompt": "teacher"}],
            "agent": {"max_steps": max_steps, "max_new_tokens": max_new_tokens},
            "num_shards": shards, "max_workers": shards, "runner": "processes",
        },
    })


def timed_evaluation(cfg, home: Path) -> tuple[float, str]:
    from flows.pipeline import run_stage_flow

    start = time.perf_counter()
    ref = run_stage_flow("evaluate", cfg, str(home))["evaluate"]
    return time.perf_counter() - start, ref.id


def predictions(home: Path, eval_id: str) -> list[tuple]:
    from storage.catalog import query

    sql = (f"select question_id, prediction, num_steps from predictions where artifact_id = '{eval_id}' "
           "order by question_id")
    return query(home, sql)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=16, help="held-out arithmetic questions")
    parser.add_argument("--max-steps", type=int, default=2, help="agent steps before the finalising call")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="token limit of one action")
    parser.add_argument("--out", type=Path, default=Path("bench/out/eval_shards.json"), help="results file")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="distillery-bench-") as tmp:
        home, corpus = Path(tmp) / "home", Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"id": str(i), "title": t, "text": x}) + "\n"
                                  for i, (t, x) in enumerate(CORPUS)))
        from flows.pipeline import run_stage_flow

        one = config(corpus, args.questions, args.max_steps, args.max_new_tokens, shards=1)
        run_stage_flow("index", one, str(home))  # built (and Prefect started) before the timing
        seconds, ids, rows = {}, {}, {}
        for shards in (1, 2):
            cfg = config(corpus, args.questions, args.max_steps, args.max_new_tokens, shards=shards)
            seconds[shards], ids[shards] = timed_evaluation(cfg, home)
            rows[shards] = predictions(home, ids[shards])
            print(f"{shards} shard(s), {max(1, cores // shards)} thread(s) each: {seconds[shards]:.1f} s, "
                  f"{len(rows[shards])} predictions", flush=True)
    same = [r[0] for r in rows[1]] == [r[0] for r in rows[2]] and len(rows[1]) == args.questions
    agree = sum(a == b for a, b in zip(rows[1], rows[2]))
    speedup = seconds[1] / seconds[2]
    results = {"cores": cores, "questions": args.questions, "max_steps": args.max_steps,
               "max_new_tokens": args.max_new_tokens, "seconds_1_shard": seconds[1],
               "seconds_2_shards": seconds[2], "speedup": speedup, "same_questions": same, "agreeing_predictions": agree}
    print(f"{args.questions} questions on {cores} cores: 1 shard {seconds[1]:.1f} s, 2 shards {seconds[2]:.1f} s")
    print(f"speed-up {speedup:.2f}  (target >= {TARGET}: {'ok' if speedup >= TARGET else 'BELOW TARGET'})")
    print(f"each question once in both runs: {same}; identical predictions: {agree}/{len(rows[1])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"written {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
