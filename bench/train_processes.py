"""Benchmark multi-process LoRA training on this machine's CPU: 2 processes against 1, same global batch.

    python bench/train_processes.py                      # SmolLM2-135M (embedded), 6 optimizer steps
    python bench/train_processes.py --model tiny --steps 20

Both runs go through ``accelerate launch`` (``training/launch.py``) on the same synthetic trajectories:
1 process with ``configs/accelerate/single_device.yaml`` and grad_accum 2 (torch uses every core), and
2 processes with ``configs/accelerate/cpu_ddp.yaml`` and grad_accum 1 (DDP over gloo, cores // 2 torch
threads each). Each optimizer step sees the same micro-batches in both runs, so their losses agree (the
largest relative difference is printed). The figure is trained tokens/s of the training loop as
``train_lora`` reports it (optimizer steps and checkpoint writes, not process start or model loading),
best of ``--passes`` interleaved passes; the launches' wall times are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.train import synthetic_examples, tiny_student

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"


def write_examples(path: Path, examples: list[list[dict]]) -> Path:
    import pyarrow.parquet as pq

    from storage.schemas import SFT_EXAMPLES, rows_to_table

    rows = [{"question_id": f"q{i}", "sample_index": 0, "dataset": "synthetic", "kind": "agent",
             "messages_json": json.dumps(messages)} for i, messages in enumerate(examples)]
    pq.write_table(rows_to_table(rows, SFT_EXAMPLES), path)
    return path


def timed_launch(folder: Path, name: str, cfg, examples: Path, accelerate_config: Path) -> tuple[dict, float]:
    """One ``accelerate launch`` run; its metrics.json and the launch's wall seconds."""
    from training.launch import TrainJob, launch_accelerate, write_job

    job = TrainJob(config=cfg, examples_path=examples, out_dir=folder / name)
    started = time.perf_counter()
    launch_accelerate(write_job(folder / f"{name}.json", job), accelerate_config)
    return json.loads((folder / name / "metrics.json").read_text()), time.perf_counter() - started


def losses(out_dir: Path) -> list[float]:
    import pyarrow.parquet as pq

    return [row["loss"] for row in pq.read_table(out_dir / "losses.parquet").to_pylist()]


def run_passes(args, folder: Path) -> tuple[float, dict, float, dict]:
    """The interleaved passes in ``folder``: (ratio, best tokens/s by run, loss gap, every run)."""
    from training.sft import TrainConfig

    model = str(tiny_student(folder / "tiny")) if args.model == "tiny" else args.model
    examples = write_examples(folder / "examples.parquet", synthetic_examples(args.examples, seed=0))

    def config(grad_accum: int) -> TrainConfig:
        # No LoRA dropout, so that the two runs' losses can be compared (dropout masks are per process).
        return TrainConfig(base_model=model, per_device_batch_size=args.per_device_batch_size,
                           grad_accum=grad_accum, epochs=10, max_length=args.max_length, max_steps=args.steps,
                           checkpoint_every=10**6, lora={"dropout": 0.0})

    runs: dict[str, list[tuple[dict, float]]] = {"one": [], "two": []}
    for index in range(args.passes):
        runs["one"].append(timed_launch(folder, f"one-{index}", config(2), examples, CONFIGS / "single_device.yaml"))
        runs["two"].append(timed_launch(folder, f"two-{index}", config(1), examples, CONFIGS / "cpu_ddp.yaml"))
        for name in ("one", "two"):
            metrics, wall = runs[name][-1]
            print(f"  pass {index + 1}, {name} process(es): {metrics['tokens_per_s']:.0f} tokens/s in the loop "
                  f"({metrics['steps']} steps, {metrics['tokens']} tokens, {metrics['step_time_s']:.2f} s/step); "
                  f"launch wall {wall:.1f} s", flush=True)
    best = {name: max(m["tokens_per_s"] for m, _ in results) for name, results in runs.items()}
    one_losses, two_losses = losses(folder / "one-0"), losses(folder / "two-0")
    loss_gap = max(abs(a - b) / abs(b) for a, b in zip(two_losses, one_losses))
    ratio = best["two"] / best["one"]
    print(f"model {args.model}, {os.cpu_count()} cores, global batch {args.per_device_batch_size * 2}: "
          f"1 process {best['one']:.0f} tokens/s, 2 processes {best['two']:.0f} tokens/s, ratio {ratio:.2f}; "
          f"losses agree within {loss_gap:.1e} relative")
    return ratio, best, loss_gap, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="student spec, local folder or 'tiny'")
    parser.add_argument("--examples", type=int, default=24, help="synthetic trajectories")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--per-device-batch-size", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--passes", type=int, default=2, help="interleaved 1-process/2-process passes (best kept)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/train_processes.json"), help="results file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="distillery-bench-ddp-") as tmp:
        ratio, best, loss_gap, runs = run_passes(args, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "cores": os.cpu_count(), "steps": args.steps,
                                    "tokens_per_s": best, "ratio": ratio, "loss_gap_rel": loss_gap,
                                    "launch_wall_s": {n: [w for _, w in r] for n, r in runs.items()}}, indent=2))


if __name__ == "__main__":
    main()
