"""LoRA supervised fine-tuning of the student on chat examples, with accelerate.

Recipe (read top to bottom in :func:`train_lora`): set up the device, seed, tokenizer and examples →
load the base model and wrap it with LoRA → run the optimizer steps, checkpointing every
``checkpoint_every`` steps → save the PEFT adapter, the loss table and its plot.

- Defaults are the paper's: LoRA rank 64, alpha 128, dropout 0.05 on all linear layers, lr 2e-4 with
  a linear schedule, 2 epochs, effective batch 8 (2 per device × 4 accumulation steps).
- The loss is the mean cross-entropy over all assistant tokens of an optimizer step (token-weighted
  across its micro-batches and processes), so long and short examples count per token.
- The data order is a pure function of (seed, epoch): ``--resume`` replays it from the checkpoint's
  step, and with the restored optimizer, scheduler and RNG states the losses continue exactly.
- ``max_steps`` stops early without changing the schedule (it is computed from ``epochs``), so a run
  stopped at step 5 and resumed to 10 equals a run of 10 steps.
- bf16 weights with bf16 autocast on GPU (float32 weights under FSDP, whose flat parameters need one
  dtype while PEFT keeps LoRA weights in float32); on a CPU float32 weights, under bf16 autocast when
  the CPU multiplies bf16 natively (AVX-512 BF16 / AMX), else plain float32.
- The adapter never uses ``modules_to_save``, so vLLM can serve it.

Run it in-process (``train_lora``) or through ``accelerate launch`` (see ``training/launch.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from common.files import atomic_dir, atomic_file
from devices.precision import resolve_dtype
from storage.store import atomic_write_table
from training.checkpoints import (
    install_adapter_state_hooks,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from training.examples import IGNORE_INDEX, ExampleError, TokenizedExample, check_template, tokenize_example

# Micro-batches per length-grouping window: large enough that neighbours have similar lengths,
# small enough that batch composition still changes from epoch to epoch.
MEGABATCH_MICRO_BATCHES = 32


class LoraSettings(BaseModel):
    """LoRA adapter shape (the paper's defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(64, ge=1, description="LoRA rank")
    alpha: int = Field(128, ge=1, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    target_modules: str | list[str] = Field(
        "all-linear", description="modules to adapt: 'all-linear' (every linear layer but the LM head) or names"
    )


class TrainConfig(BaseModel):
    """One LoRA SFT run of the student."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str = Field("smollm2-135m-instruct", description="student spec for models.resolve.resolve_model")
    lora: LoraSettings = Field(LoraSettings(), description="adapter shape")
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate of the linear schedule")
    epochs: float = Field(2, gt=0, description="passes over the examples; sets the schedule length")
    per_device_batch_size: int = Field(2, ge=1, description="examples per micro-batch on each process")
    grad_accum: int = Field(4, ge=1, description="micro-batches per optimizer step (effective batch 2×4=8)")
    max_length: int = Field(2048, ge=8, description="longest training sequence in tokens")
    overflow: Literal["truncate", "drop"] = Field(
        "truncate", description="over-long examples: cut after the last assistant turn that fits, or drop"
    )
    group_by_length: bool = Field(True, description="batch examples of similar length to limit padding")
    seed: int = Field(0, description="seeds LoRA init, dropout and the data order")
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="complete checkpoints kept on disk")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (schedule unchanged)")
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0, description="fraction of steps with linear warmup")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    log_every: int = Field(1, ge=1, description="record the loss every this many steps")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="compute precision (float32 weights either way): auto = bf16 autocast on a GPU and on "
                            "a CPU with native bf16, else float32; float32 reproduces a CPU without native bf16"
    )


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the update was not applied."""


@dataclass
class TrainingData:
    """Tokenised examples and what happened to the rest."""

    examples: list[TokenizedExample]
    dropped: int
    truncated: int

    @property
    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.examples]


@dataclass
class Run:
    """Everything the loop needs; ``stream`` is every global micro-batch of the run, in order."""

    cfg: TrainConfig
    tokenizer: Any
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    data: TrainingData
    stream: list[list[int]]
    micro_per_epoch: int
    total_steps: int
    fingerprint: str
    pad_id: int


@dataclass
class LoopState:
    """Loop state saved in checkpoints: optimizer steps done, tokens trained, logged loss rows
    (``checkpoint_s``, the time this session spent writing checkpoints, is not saved)."""

    step: int = 0
    tokens: int = 0
    losses: list[dict] = field(default_factory=list)
    checkpoint_s: float = 0.0


# ---------------------------------------------------------------- data


def prepare_data(tokenizer, examples: list[list[dict]], cfg: TrainConfig) -> TrainingData:
    """Tokenise every example (assistant-only labels); raise ValueError if none is left."""
    if not examples:
        raise ValueError("the training set is empty: no examples to train on")
    kept, dropped, truncated = [], 0, 0
    for index, messages in enumerate(examples):
        try:
            example = tokenize_example(tokenizer, messages, cfg.max_length, cfg.overflow)
        except ExampleError as error:
            raise ExampleError(f"training example {index}: {error}") from error
        if example is None:
            dropped += 1
            continue
        truncated += example.truncated
        kept.append(example)
    if not kept:
        raise ValueError(
            f"all {len(examples)} training examples were dropped as longer than max_length={cfg.max_length} "
            f"tokens (overflow={cfg.overflow!r}); raise max_length"
        )
    return TrainingData(kept, dropped, truncated)


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """The micro-batches (example indices) of one epoch: a pure function of its arguments.

    With length grouping, the shuffled examples are cut into windows of MEGABATCH_MICRO_BATCHES
    micro-batches, each window sorted by length and chunked, and the batches shuffled again.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * MEGABATCH_MICRO_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def run_stream(lengths: list[int], cfg: TrainConfig, num_processes: int) -> tuple[list[list[int]], int, int]:
    """All global micro-batches of the run, the micro-batches per epoch, and the optimizer steps.

    An optimizer step consumes ``grad_accum × num_processes`` consecutive micro-batches; the run has
    ``ceil(epochs × micro_per_epoch / that)`` steps, the last one filled from the next epoch's order.
    """
    micro_per_epoch = math.ceil(len(lengths) / cfg.per_device_batch_size)
    per_step = cfg.grad_accum * num_processes
    total_steps = max(1, math.ceil(cfg.epochs * micro_per_epoch / per_step))
    stream: list[list[int]] = []
    epoch = 0
    while len(stream) < total_steps * per_step:
        stream += epoch_batches(lengths, cfg.per_device_batch_size, cfg.seed, epoch, cfg.group_by_length)
        epoch += 1
    return stream[: total_steps * per_step], micro_per_epoch, total_steps


def padding_waste(lengths: list[int], batches: list[list[int]]) -> float:
    """Padded positions ÷ all positions when each batch is padded to its longest example."""
    total = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1.0 - sum(lengths[i] for b in batches for i in b) / total


def collate(examples: list[TokenizedExample], indices: list[int], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding has attention 0 and label -100."""
    width = max(len(examples[i].input_ids) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    labels = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(examples[i].input_ids)
        ids[row, :n] = torch.tensor(examples[i].input_ids)
        labels[row, :n] = torch.tensor(examples[i].labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def label_tokens(examples: list[TokenizedExample], indices: list[int]) -> int:
    """Predicted (assistant) tokens of a micro-batch: labels after the one-position shift."""
    return sum(sum(t != IGNORE_INDEX for t in examples[i].labels[1:]) for i in indices)


def summed_token_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over the labelled positions of a micro-batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    # Shift the labels, not the logits: slicing the (batch, len, vocab) logits would copy them.
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


# ---------------------------------------------------------------- setup


def make_accelerator(cfg: TrainConfig):
    """The one place that picks the device and precision: ``cfg.precision``; auto is bf16 autocast on CUDA
    and on CPUs with native bf16 matmuls (float32 weights there), else float32. Without CUDA the Accelerator is put on the CPU,
    so that processes started by ``accelerate launch`` (configs/accelerate/cpu_ddp.yaml) join one
    torch.distributed group over gloo instead of each training alone."""
    from accelerate import Accelerator

    on_gpu = torch.cuda.is_available()
    precision = "bf16" if resolve_dtype(cfg.precision, "cuda" if on_gpu else "cpu") == "bfloat16" else "no"
    return Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision, cpu=not on_gpu)


def load_tokenizer(spec: str):
    """The student's tokenizer from local files (never the hub); a GGUF's through the tokenizer cache."""
    from agent_runtime.backends.transformers_backend import load_tokenizer as cached_tokenizer
    from models.resolve import resolve_model

    return cached_tokenizer(resolve_model(spec))


def load_lora_model(cfg: TrainConfig, dtype: torch.dtype) -> torch.nn.Module:
    """The base model with fresh LoRA adapters on ``cfg.lora.target_modules``; base weights frozen."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from agent_runtime.backends.transformers_backend import hf_folder
    from models.resolve import resolve_model

    # A GGUF base is read from its de-quantised cache folder, as the transformers backend and OPD read it.
    base = AutoModelForCausalLM.from_pretrained(hf_folder(resolve_model(cfg.base_model)), dtype=dtype)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    # vLLM cannot serve adapters with fully trained extra modules; fail loudly if one sneaks in.
    if model.peft_config["default"].modules_to_save:
        raise ValueError(f"LoRA config must not use modules_to_save, got {model.peft_config['default'].modules_to_save}")
    model.peft_config["default"].base_model_name_or_path = cfg.base_model
    return model


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary, special tokens and chat template."""
    payload = json.dumps(
        [sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens, tokenizer.chat_template],
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def run_fingerprint(cfg: TrainConfig, data: TrainingData) -> str:
    """Identifies what a checkpoint can resume: the config (minus stopping/logging knobs) and the data."""
    relevant = cfg.model_dump(exclude={"max_steps", "checkpoint_every", "keep_checkpoints", "log_every"})
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode())
    for example in data.examples:
        digest.update(np.asarray(example.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(example.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def setup_run(cfg: TrainConfig, examples: list[list[dict]], accelerator) -> Run:
    """Seed, tokenise, build the LoRA model, optimizer and schedule, and hand them to accelerate."""
    from accelerate.utils import DistributedType, set_seed
    from transformers import get_linear_schedule_with_warmup

    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.base_model)
    check_template(tokenizer, cfg.base_model)
    data = prepare_data(tokenizer, examples, cfg)  # fails fast, before the slow model load
    on_gpu = accelerator.device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu and accelerator.distributed_type != DistributedType.FSDP else torch.float32
    model = accelerator.prepare(load_lora_model(cfg, dtype))  # FSDP needs the model wrapped before the optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    stream, micro_per_epoch, total_steps = run_stream(data.lengths, cfg, accelerator.num_processes)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    optimizer = accelerator.prepare(optimizer)
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it
    # once per process), so it is only registered for checkpointing.
    accelerator.register_for_checkpointing(scheduler)
    install_adapter_state_hooks(accelerator, model)
    # Padding is masked out of attention and labels, so EOS serves when there is no pad token.
    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    return Run(
        cfg, tokenizer, model, optimizer, scheduler, data, stream, micro_per_epoch, total_steps,
        run_fingerprint(cfg, data), pad_id,
    )


# ---------------------------------------------------------------- loop


def train_step(run: Run, accelerator, step: int) -> tuple[float, int]:
    """One optimizer step over its micro-batches; returns (mean token loss, tokens trained).

    Each micro-batch's summed loss is scaled so that after accelerate's division by ``grad_accum``
    and the all-reduce's mean over processes the gradient is that of the step's mean token loss.
    """
    cfg, examples, procs = run.cfg, run.data.examples, accelerator.num_processes
    per_step = cfg.grad_accum * procs
    batches = run.stream[step * per_step : (step + 1) * per_step]
    step_labels = sum(label_tokens(examples, b) for b in batches)
    step_tokens = sum(len(examples[i].input_ids) for b in batches for i in b)
    loss_sum = torch.zeros((), device=accelerator.device)
    for micro in range(cfg.grad_accum):
        batch = collate(examples, batches[micro * procs + accelerator.process_index], run.pad_id, accelerator.device)
        with accelerator.accumulate(run.model):
            token_loss = summed_token_loss(run.model, batch)
            accelerator.backward(token_loss * (per_step / max(step_labels, 1)))
        loss_sum += token_loss.detach()
    loss = accelerator.reduce(loss_sum, reduction="sum").item() / max(step_labels, 1)
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"loss is {loss} at optimizer step {step + 1} (examples {batches}); the update was not applied. "
            "Resume from the last checkpoint with a lower learning_rate, or inspect those examples"
        )
    accelerator.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad()
    run.scheduler.step()
    return loss, step_tokens


def run_steps(
    run: Run, accelerator, progress: LoopState, checkpoints: Path,
    on_step: Callable[[int, int, float], None] | None = None,
) -> LoopState:
    """Train from ``progress.step`` to the last step (``max_steps`` or the schedule's end),
    checkpointing every ``checkpoint_every`` steps and at the end."""
    from tqdm.auto import tqdm

    cfg = run.cfg
    last = min(run.total_steps, cfg.max_steps or run.total_steps)
    per_step = cfg.grad_accum * accelerator.num_processes
    run.model.train()
    bar = tqdm(total=last, initial=progress.step, desc="sft", disable=not accelerator.is_main_process)
    while progress.step < last:
        lr = run.scheduler.get_last_lr()[0]
        loss, tokens = train_step(run, accelerator, progress.step)
        progress.step += 1
        progress.tokens += tokens
        if progress.step % cfg.log_every == 0 or progress.step == last:
            epoch = progress.step * per_step / run.micro_per_epoch
            progress.losses.append(
                {"step": progress.step, "epoch": epoch, "loss": loss, "lr": lr, "tokens": progress.tokens}
            )
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if on_step is not None and accelerator.is_main_process:
            on_step(progress.step, last, loss)
        if progress.step % cfg.checkpoint_every == 0 or progress.step == last:
            record = {"step": progress.step, "tokens": progress.tokens, "losses": progress.losses,
                      "fingerprint": run.fingerprint}
            saving = time.perf_counter()
            save_checkpoint(accelerator, checkpoints, progress.step, record, cfg.keep_checkpoints)
            progress.checkpoint_s += time.perf_counter() - saving
    bar.close()
    return progress


def resume_progress(run: Run, accelerator, checkpoints: Path) -> LoopState:
    """Restore the newest complete checkpoint into ``run``; a fresh LoopState when there is none."""
    path = latest_checkpoint(checkpoints)
    if path is None:
        if accelerator.is_main_process:
            print(f"resume: no complete checkpoint under {checkpoints}; training from scratch")
        return LoopState()
    record = load_checkpoint(accelerator, path)
    if record["fingerprint"] != run.fingerprint:
        raise ValueError(
            f"checkpoint {path} was written by a run with another config or other data "
            f"(fingerprint {record['fingerprint']} != {run.fingerprint}); use a new out_dir or delete it"
        )
    if accelerator.is_main_process:
        print(f"resume: continuing from {path} (step {record['step']} of {run.total_steps})")
    return LoopState(step=record["step"], tokens=record["tokens"], losses=record["losses"])


# ---------------------------------------------------------------- outputs


def save_adapter(run: Run, accelerator, target: Path) -> None:
    """Write the PEFT adapter (adapter_config.json, adapter_model.safetensors) atomically."""
    state = accelerator.get_state_dict(run.model)  # a collective under FSDP: every process calls it
    if not accelerator.is_main_process:
        return
    with atomic_dir(target) as temporary:
        # save_embedding_layers=False: embeddings are never trained, and "auto" would probe the hub.
        accelerator.unwrap_model(run.model).save_pretrained(
            temporary, state_dict=state, safe_serialization=True, save_embedding_layers=False
        )


def write_losses(rows: list[dict], parquet_path: Path, plot_path: Path) -> None:
    """The loss table (schema storage.schemas.LOSSES) and its plot, each written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from storage.schemas import LOSSES, rows_to_table

    atomic_write_table(parquet_path, rows_to_table(rows, LOSSES))
    figure = Figure(figsize=(6, 3.5), layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="." if len(rows) < 50 else None)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (mean token cross-entropy)")
    axes.set_title("student LoRA SFT")
    axes.grid(alpha=0.3)
    with atomic_file(plot_path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=100)


def train_lora(
    cfg: TrainConfig, examples: list[list[dict]], out_dir: Path, resume: bool = False,
    on_step: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Fine-tune ``cfg.base_model`` with LoRA on chat ``examples`` and write the artifact files.

    Writes ``out_dir/adapter/{adapter_config.json, adapter_model.safetensors}``, ``losses.parquet``,
    ``loss.png``, ``metrics.json`` and checkpoints under ``out_dir/checkpoints/``. With ``resume``,
    continues from the newest complete checkpoint (same data order, optimizer, scheduler, RNG).
    ``on_step(step, last_step, loss)`` is called on the main process after every optimizer step.
    Returns the metrics: steps, tokens, final_loss, tokens_per_s, examples, dropped, truncated,
    tokenizer_fingerprint, mixed_precision (plus total_steps, step_time_s, loop_s and checkpoint_s, the
    seconds of this session's loop and of its checkpoint writes; tokens_per_s counts both).
    Raises ValueError for an empty training set, TemplateError for an unusable chat template,
    NonFiniteLossError when the loss diverges.
    """
    out_dir = Path(out_dir)
    accelerator = make_accelerator(cfg)
    run = setup_run(cfg, examples, accelerator)
    checkpoints = out_dir / "checkpoints"
    progress = resume_progress(run, accelerator, checkpoints) if resume else LoopState()
    start_step, start_tokens, started = progress.step, progress.tokens, time.perf_counter()
    progress = run_steps(run, accelerator, progress, checkpoints, on_step)
    elapsed = time.perf_counter() - started
    save_adapter(run, accelerator, out_dir / "adapter")
    metrics = {
        "steps": progress.step,
        "total_steps": run.total_steps,
        "tokens": progress.tokens,
        "final_loss": progress.losses[-1]["loss"] if progress.losses else None,
        "tokens_per_s": (progress.tokens - start_tokens) / elapsed if progress.step > start_step else None,
        "step_time_s": elapsed / (progress.step - start_step) if progress.step > start_step else None,
        "loop_s": elapsed,
        "checkpoint_s": progress.checkpoint_s,
        "examples": len(run.data.examples),
        "dropped": run.data.dropped,
        "truncated": run.data.truncated,
        "tokenizer_fingerprint": tokenizer_fingerprint(run.tokenizer),
        # what ``auto`` precision resolved to on this machine ("bf16" or "no"): it is not part of the
        # artifact id, so the same id trained on CPUs with and without native bf16 differs in its numerics
        "mixed_precision": str(accelerator.mixed_precision),
    }
    if accelerator.is_main_process:
        write_losses(progress.losses, out_dir / "losses.parquet", out_dir / "loss.png")
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    accelerator.wait_for_everyone()
    return metrics
