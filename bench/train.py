"""Benchmark the LoRA SFT loop: its throughput against a bare loop, and padding with/without length grouping.

    python bench/train.py                       # SmolLM2-135M (embedded), 24 synthetic trajectories
    python bench/train.py --model tiny --steps 20   # a 2-layer random Llama: the loop's overhead shows most
    python bench/train.py --model PATH --steps 4 --passes 1

1. Loop efficiency: trained tokens/s of ``train_lora`` (accelerate, loss bookkeeping, progress bar,
   loss guard) ÷ tokens/s of a bare ``forward + backward + optimizer.step`` loop over the same
   micro-batches with the same LoRA model (the ceiling), both over optimizer steps 2..N (step 1 warms
   up; checkpoints are off, a run writes one every ``checkpoint_every`` steps). Measured by CPU time
   of this process (robust when other jobs share the cores) and by wall time. Target: ≥ 0.9.
2. Padding waste (padded positions ÷ all positions) of one epoch's micro-batches with length grouping
   vs without, on the same tokenised examples.

Both loops run ``--passes`` times, interleaved (bare, loop, bare, loop), and the best of each is
kept, because this machine's cores are shared.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SYSTEM = "You are an agent that solves tasks by writing Python code. Call final_answer(x) to finish."


def synthetic_examples(count: int, seed: int) -> list[list[dict]]:
    """Agent trajectories of 1-4 steps with thoughts of varied length (so lengths spread out)."""
    from training.examples import agent_messages

    rng = random.Random(seed)
    words = ["compute", "search", "the", "value", "of", "population", "year", "then", "check", "answer"]
    examples = []
    for index in range(count):
        steps = []
        for step in range(rng.randint(1, 4)):
            thought = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
            code = f"result = web_search('{rng.choice(words)} {index} {step}')\nprint(result)"
            observation = " ".join(rng.choice(words) for _ in range(rng.randint(10, 80)))
            steps.append((f"Thought: {thought}\nCode:\n```py\n{code}\n```<end_code>", f"Observation:\n{observation}"))
        steps.append((f"Thought: done.\nCode:\n```py\nfinal_answer({index})\n```<end_code>", ""))
        examples.append(agent_messages(SYSTEM, f"Question {index}: {' '.join(rng.choices(words, k=12))}?", steps))
    return examples


class StepClock:
    """Wall and CPU (process) time after each optimizer step, and the cumulative tokens trained.

    CPU time is what makes the ratio meaningful on a shared machine: other tenants stretch wall
    time by whole seconds, but not the CPU seconds this process spends per token.
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.tokens: list[int] = []

    def tick(self, tokens: int) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.tokens.append(tokens)

    def rates(self) -> tuple[float, float]:
        """(tokens per wall second, tokens per CPU second) over steps 2..N (step 1 warms up)."""
        tokens = self.tokens[-1] - self.tokens[0]
        return tokens / (self.wall[-1] - self.wall[0]), tokens / (self.cpu[-1] - self.cpu[0])


def bare_loop(cfg, examples: list[list[dict]]) -> StepClock:
    """Plain forward+backward+step over the micro-batches train_lora would use (the ceiling), in the
    precision train_lora picks (bf16 autocast on CPUs with native bf16)."""
    import torch

    from devices.precision import cpu_has_native_bf16
    from training.sft import (
        collate,
        label_tokens,
        load_lora_model,
        load_tokenizer,
        prepare_data,
        run_stream,
        summed_token_loss,
    )

    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.base_model)
    data = prepare_data(tokenizer, examples, cfg)
    model = load_lora_model(cfg, torch.float32).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    stream, _, total_steps = run_stream(data.lengths, cfg, num_processes=1)
    clock, tokens = StepClock(), 0
    for step in range(min(total_steps, cfg.max_steps or total_steps)):
        batches = stream[step * cfg.grad_accum : (step + 1) * cfg.grad_accum]
        count = sum(label_tokens(data.examples, b) for b in batches)
        for indices in batches:
            batch = collate(data.examples, indices, tokenizer.pad_token_id, "cpu")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_native_bf16()):
                loss = summed_token_loss(model, batch) / count
            loss.backward()
            tokens += sum(len(data.examples[i].input_ids) for i in indices)
        optimizer.step()
        optimizer.zero_grad()
        clock.tick(tokens)
    return clock


def sft_loop(cfg, examples: list[list[dict]]) -> tuple[StepClock, dict]:
    """train_lora itself, clocked through its on_step callback (so setup and saving are excluded)."""
    import pyarrow.parquet as pq

    from training.sft import train_lora

    clock, marks = StepClock(), []
    with tempfile.TemporaryDirectory() as out:
        metrics = train_lora(cfg, examples, Path(out),
                             on_step=lambda step, total, loss: marks.append((time.perf_counter(), time.process_time())))
        tokens = [row["tokens"] for row in pq.read_table(Path(out) / "losses.parquet").to_pylist()]
    for (wall, cpu), seen in zip(marks, tokens, strict=True):
        clock.wall.append(wall)
        clock.cpu.append(cpu)
        clock.tokens.append(seen)
    return clock, metrics


def tiny_student(folder: Path) -> Path:
    """A 2-layer, hidden-64 random Llama with SmolLM2's tokenizer, saved to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.sft import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def padding_report(cfg, examples: list[list[dict]]) -> tuple[float, float]:
    from training.sft import epoch_batches, load_tokenizer, padding_waste, prepare_data

    lengths = prepare_data(load_tokenizer(cfg.base_model), examples, cfg).lengths
    grouped = padding_waste(lengths, epoch_batches(lengths, cfg.per_device_batch_size, cfg.seed, 0, True))
    plain = padding_waste(lengths, epoch_batches(lengths, cfg.per_device_batch_size, cfg.seed, 0, False))
    return grouped, plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="student spec, local folder or 'tiny'")
    parser.add_argument("--examples", type=int, default=24, help="synthetic trajectories")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timed run")
    parser.add_argument("--passes", type=int, default=2, help="interleaved bare/loop passes (best is kept)")
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--padding-examples", type=int, default=256, help="trajectories for the padding measure")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps CPU time free of spinning)")
    args = parser.parse_args()

    import torch

    from training.sft import TrainConfig

    torch.set_num_threads(args.threads)

    model = str(tiny_student(Path(tempfile.mkdtemp(prefix="tiny-student-")))) if args.model == "tiny" else args.model
    cfg = TrainConfig(base_model=model, epochs=10, max_length=args.max_length, max_steps=args.steps,
                      grad_accum=args.grad_accum, checkpoint_every=10**6)
    examples = synthetic_examples(args.examples, seed=0)

    grouped, plain = padding_report(cfg, synthetic_examples(args.padding_examples, seed=1))
    print(f"padding waste, batch {cfg.per_device_batch_size}: grouped {grouped:.3f} vs ungrouped {plain:.3f} "
          f"({plain / max(grouped, 1e-9):.1f}x less padding with length grouping)")

    bare_wall, bare_cpu, loop_wall, loop_cpu = [], [], [], []
    for _ in range(args.passes):
        wall, cpu = bare_loop(cfg, examples).rates()
        bare_wall.append(wall)
        bare_cpu.append(cpu)
        clock, metrics = sft_loop(cfg, examples)
        wall, cpu = clock.rates()
        loop_wall.append(wall)
        loop_cpu.append(cpu)
        print(f"  pass: bare {bare_wall[-1]:.0f} tok/s ({bare_cpu[-1]:.0f} per CPU-s), "
              f"loop {loop_wall[-1]:.0f} tok/s ({loop_cpu[-1]:.0f} per CPU-s); "
              f"train_lora reports {metrics['tokens_per_s']:.0f} tok/s, {metrics['step_time_s']:.2f} s/step, "
              f"end-of-run checkpoint {metrics['checkpoint_s']:.2f} s")
    print(f"model {args.model}: {metrics['steps']} steps x effective batch "
          f"{cfg.per_device_batch_size * cfg.grad_accum}, {metrics['tokens']} tokens/run, "
          f"{torch.get_num_threads()} torch thread(s)")
    print(f"loop efficiency by CPU time: {max(loop_cpu):.0f} / {max(bare_cpu):.0f} tok/CPU-s = "
          f"{max(loop_cpu) / max(bare_cpu):.3f} (target >= 0.9)")
    print(f"loop efficiency by wall time (noisy on a shared machine): {max(loop_wall):.0f} / {max(bare_wall):.0f} "
          f"tok/s = {max(loop_wall) / max(bare_wall):.3f}")

if __name__ == "__main__":
    main()
