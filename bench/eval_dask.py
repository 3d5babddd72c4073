"""Benchmark the ``dask`` evaluation runner: 2 Dask worker processes against the ``threads`` runner.

    python bench/eval_dask.py --questions 16 --max-steps 2

Both runs go through the real ``evaluate`` flow (Prefect, FAISS retrieval, sandbox, SmolLM2-135M agent on
the transformers backend) with 2 shards of the same questions. ``threads``: both shards in this process,
sharing its torch thread pool (every core). ``dask``: a ``dask scheduler`` and 2 ``dask worker``
processes on loopback (1 thread and ``OMP_NUM_THREADS = cores // 2`` each), started before the timing,
as on a cluster. A Prefect server is started first and every process reports to it (a Dask worker
without ``PREFECT_API_URL`` would start a temporary server of its own). The index is built before the
timing. Each question must be predicted once in both runs (checked); decoding is greedy, so the
predictions agree up to the float noise of different batch compositions (the agreement is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.eval_shards import CORPUS, predictions
from bench.local_services import dask_cluster, prefect_server


def config(corpus: Path, questions: int, max_steps: int, max_new_tokens: int, runner: str, address: str | None):
    from flows.config import PipelineConfig

    return PipelineConfig.model_validate({
        "index": {"corpus": {"source": str(corpus)}},
        "sandbox": {"workers": 2},
        "evaluate": {
            "datasets": [{"name": "arith", "source": "builtin:arith", "split": "test", "kind": "math",
                          "num_questions": questions}],
            "methods": [{"name": "agent", "model": "student", "mode": "agent", "prompt": "teacher"}],
            "agent": {"max_steps": max_steps, "max_new_tokens": max_new_tokens},
            "num_shards": 2, "max_workers": 2, "runner": runner, "address": address,
        },
    })


def timed_evaluation(cfg, home: Path) -> tuple[float, str]:
    from flows.pipeline import run_stage_flow

    started = time.perf_counter()
    ref = run_stage_flow("evaluate", cfg, str(home))["evaluate"]
    return time.perf_counter() - started, ref.id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=16, help="held-out arithmetic questions")
    parser.add_argument("--max-steps", type=int, default=2, help="agent steps before the finalising call")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="token limit of one action")
    parser.add_argument("--out", type=Path, default=Path("bench/out/eval_dask.json"), help="results file")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="distillery-bench-dask-") as tmp:
        home, logs, corpus = Path(tmp) / "home", Path(tmp) / "logs", Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"id": str(i), "title": t, "text": x}) + "\n"
                                  for i, (t, x) in enumerate(CORPUS)))
        worker_env = {"OMP_NUM_THREADS": str(max(1, cores // 2)), "DISTILLERY_HOME": str(home)}
        with prefect_server(home, logs) as api_url:
            worker_env["PREFECT_API_URL"] = api_url
            with dask_cluster(2, logs, env=worker_env) as address:
                from prefect.settings import PREFECT_API_URL, temporary_settings

                from flows.pipeline import run_stage_flow

                seconds, rows = {}, {}
                with temporary_settings(updates={PREFECT_API_URL: api_url}):
                    run_stage_flow("index", config(corpus, args.questions, args.max_steps, args.max_new_tokens,
                                                   "threads", None), str(home))  # built before the timing
                    for runner in ("threads", "dask"):
                        cfg = config(corpus, args.questions, args.max_steps, args.max_new_tokens, runner,
                                     address if runner == "dask" else None)
                        seconds[runner], eval_id = timed_evaluation(cfg, home)
                        rows[runner] = predictions(home, eval_id)
                        print(f"runner {runner}: {seconds[runner]:.1f} s, {len(rows[runner])} predictions",
                              flush=True)
    same = [r[0] for r in rows["threads"]] == [r[0] for r in rows["dask"]] and len(rows["dask"]) == args.questions
    agree = sum(a == b for a, b in zip(rows["threads"], rows["dask"]))
    ratio = seconds["threads"] / seconds["dask"]
    results = {"cores": cores, "questions": args.questions, "max_steps": args.max_steps,
               "max_new_tokens": args.max_new_tokens, "seconds_threads": seconds["threads"],
               "seconds_dask": seconds["dask"], "throughput_dask_over_threads": ratio, "same_questions": same,
               "agreeing_predictions": agree}
    print(f"{args.questions} questions on {cores} cores: threads {seconds['threads']:.1f} s, "
          f"2 Dask workers {seconds['dask']:.1f} s; throughput ratio dask/threads {ratio:.2f}")
    print(f"each question once in both runs: {same}; identical predictions: {agree}/{len(rows['threads'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"written {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
