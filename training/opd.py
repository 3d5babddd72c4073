"""On-policy distillation (OPD) of an agent: the student learns on its own trajectories from the teacher's
per-token judgement.

One iteration: the student (base + its current LoRA adapter) runs as a CodeAct agent on training questions
(``tasks/opd.py`` samples the episodes with the project's engine, sandbox and retriever); the teacher scores
every token the student wrote in each assistant turn, in exactly the student's context (``Generator.score``
on the same messages); this module aligns those scores with the student's own tokens and updates the adapter.

The objective is the per-token reverse KL, KL(π_student ‖ π_teacher), on the student's own samples. Its
estimator is the sampled one used for on-policy distillation (a policy gradient with a per-token reward):

    A_t    = clip(log π_T(x_t | x_<t) − log π_old(x_t | x_<t), −kl_clip, kl_clip) − b       (detached)
    loss   = − Σ_t A_t · exp(log π_θ(x_t | x_<t) − log π_old(x_t | x_<t))  /  Σ_t 1

over the tokens the student generated (prompt, system, observation and template tokens carry no loss), where
π_old is the adapter the episodes were sampled with, evaluated by this module's model in float (its value
is stored beside the teacher's). At θ = old the ratio is 1 and the gradient is Σ_t A_t ∇ log π_θ(x_t), the
REINFORCE gradient of E[Σ_t log π_T − log π_θ] with the per-token reward; the ratio keeps the later micro-
batches of an iteration on-policy (importance weight). ``−mean(A_t)`` before clipping (and without b) is the k1
estimate of the reverse KL reported per step, iteration, dataset and segment.

The baseline b is 0 (``baseline: none``, the estimator as published) or, with ``baseline: batch_mean``, the mean
clipped advantage over the optimizer step's tokens. A constant b leaves the expected gradient unchanged
(E[∇ log π_θ] = 0 under the student's own samples) and only lowers its variance: without it, when the teacher
rates nearly every sampled token below the student (A_t < 0 on average, as early in distillation), each step
pushes down whatever was sampled, and with few episodes per step that noise decides which behaviour shrinks.
With b the tokens the teacher rates above the step's average are raised and those below it lowered.

The ``<end_code>`` marker that ends an action carries no loss by default (``stop_marker: masked``; its tokens
are stored with the segment ``stop``). The engine stops generation at that string, so the scored text ends
inside what the teacher would write as one piece: measured on the study's opd/1 tokens, the teacher gave the
marker's last token ``>`` a mean log-prob of −1.14 where the student, taught the marker by the SFT stage, gave
−0.001 (``results/cpu-study/report.md``, stage 6). That gap measures where the text was cut, not the action;
trained on, it lowers the student's probability of ending its actions.

Differences from a GPU implementation, stated: the episodes are sampled by the project's student backend
(llama.cpp's quantised model with the adapter on a CPU), while π_old and π_θ are the de-quantised model
here, so the importance weight is taken against π_old, not against the sampler's exact probabilities; the
model runs in eval mode (no LoRA dropout) so that π_θ = π_old before the first update.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from agent_runtime.backends import BackendConfig
from agent_runtime.engine import AgentConfig
from agent_runtime.prompts import END_CODE
from questions.datasets import DatasetConfig
from training.examples import ExampleError, assistant_spans, validate_messages

Segment = Literal["thought", "code", "final", "stop"]


class OpdConfig(BaseModel):
    """The ``opd`` stage: K iterations of sampling, teacher scoring and a reverse-KL update of the adapter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    iterations: int = Field(2, ge=1, description="iterations, each re-sampling from the updated student "
                                                 "(each its own artifact opd/1 … opd/K)")
    datasets: tuple[DatasetConfig, ...] | None = Field(
        None, description="training questions (gold optional); None: the rollout's datasets")
    limit: int | None = Field(None, ge=1, description="take only the first N questions of each dataset")
    samples_per_question: int = Field(1, ge=1, description="student episodes per question and iteration")
    agent: AgentConfig = Field(
        AgentConfig(prompt="student", temperature=0.7, top_p=1.0, max_steps=4, max_new_tokens=256),
        description="how the student runs (sampled: temperature > 0; prompt as in evaluation)")
    scorer: BackendConfig | None = Field(
        None, description="the teacher on a backend that scores given tokens (transformers, vllm, or vLLM's "
                          "server through openai); None: the teacher's model on transformers")
    scorer_prompt: Literal["student", "teacher"] = Field(
        "student", description="the system prompt of the context the teacher scores in: student (exactly the "
                               "student's context, as published) or teacher (its own prompt, with the action "
                               "format's worked examples, in place of the student's; the rest unchanged)")
    learning_rate: float = Field(2e-5, gt=0, description="AdamW learning rate of the adapter (constant)")
    episodes_per_step: int = Field(8, ge=1, description="episodes per optimizer step")
    epochs: int = Field(1, ge=1, description="passes over an iteration's episodes")
    kl_clip: float = Field(5.0, gt=0, description="clip of the per-token advantage log π_T − log π_old (nats)")
    baseline: Literal["none", "batch_mean"] = Field(
        "none", description="subtracted from the clipped advantage: none (as published) or batch_mean, the "
                            "mean over the optimizer step's tokens (same expected gradient, lower variance)")
    stop_marker: Literal["masked", "scored"] = Field(
        "masked", description="the <end_code> marker that ends an action: masked (no loss: the SFT stage taught "
                              "it, and the teacher scores text cut at a stop string, so it rates where the cut "
                              "falls, not the action) or scored")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    max_length: int = Field(4096, ge=8, description="longest episode in tokens; longer ones are cut after the "
                                                    "last assistant turn that fits")
    seed: int = Field(0, description="seeds the episode order; the sampling seeds add the iteration")

    def identity(self) -> dict:
        """What an iteration's artifact id hashes: everything but the number of iterations (so raising
        ``iterations`` keeps the ids of the iterations already built)."""
        return self.model_dump(mode="json", exclude={"iterations"})


@dataclass
class OpdExample:
    """One episode ready for the update: its token ids and, for each generated token, where it sits, its
    segment, and the teacher's and the sampling student's log-probs."""

    key: tuple[str, str, int]  # (dataset, question_id, sample_index)
    input_ids: list[int]
    positions: list[int]  # indices into input_ids of the scored (generated) tokens
    teacher: list[float]
    old: list[float]
    steps: list[int]  # the agent step of each scored token
    segments: list[str]


@dataclass
class AlignedTurn:
    """The tokens of one assistant turn inside the whole episode's rendering."""

    step: int
    start: int  # index of the turn's first token in the episode's ids
    token_ids: list[int]
    segments: list[str]


def token_segments(tokenizer, text: str, token_ids: list[int], is_final: bool) -> list[str]:
    """The segment of each token of an assistant turn: ``final`` for the finalising action, else ``thought``
    before its code block and ``code`` from the block's opening fence on; in both, ``stop`` for the tokens of
    the ``<end_code>`` marker that ends an action the stop string ended."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded.input_ids) != list(token_ids):
        raise ExampleError("the turn's tokens differ from the scored ones")
    fence = text.find("```")
    marker = len(text) - len(END_CODE) if text.endswith(END_CODE) else len(text)
    return ["stop" if end > marker else "final" if is_final else "code" if 0 <= fence < end else "thought"
            for _, end in encoded.offset_mapping]


def align_turns(tokenizer, messages: list[dict], scored_ids: list[list[int]], finals: list[bool]
                ) -> tuple[list[int], list[AlignedTurn]]:
    """The episode's token ids and, per assistant turn, where the teacher's scored tokens sit in them.

    ``scored_ids[j]`` are the tokens ``Generator.score`` returned for assistant turn j (its text tokenized
    alone); they must be the first tokens of that turn's span in the whole rendering (the chat template
    renders history unchanged and the turn starts after a special token), else ExampleError.
    """
    messages = episode_messages(messages)
    full, spans = assistant_spans(tokenizer, messages)
    if len(spans) != len(scored_ids):
        raise ExampleError(f"{len(spans)} assistant turns but {len(scored_ids)} scored completions")
    texts = [m["content"] for m in messages if m["role"] == "assistant"]
    turns = []
    for j, ((start, end), ids, text, final) in enumerate(zip(spans, scored_ids, texts, finals)):
        if full[start:start + len(ids)] != list(ids) or start + len(ids) > end:
            raise ExampleError(f"assistant turn {j + 1}: the scored tokens are not the turn's tokens in the episode")
        turns.append(AlignedTurn(j + 1, start, list(ids), token_segments(tokenizer, text, ids, final)))
    return full, turns


def episode_messages(messages: list[dict]) -> list[dict]:
    """``messages`` up to its last assistant turn, checked as an agent episode is sent to the model: a system
    message, the question, then assistant turns each after one or more user messages (an observation, and at
    the step limit the engine's separate "write the final answer" instruction). What follows the last
    assistant turn (its observation) holds no student token. Raises ExampleError naming the message."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages) - 1)
    validate_messages(messages[: last + 1], repeated_user=True)
    return messages[: last + 1]


def opd_example(key: tuple[str, str, int], full: list[int], turns: list[AlignedTurn], teacher: list[list[float]],
                max_length: int) -> OpdExample | None:
    """The example of one episode, cut after the last turn that fits in ``max_length`` (None: none fits)."""
    positions, lps, steps, segments = [], [], [], []
    cut = 0
    for turn, lp in zip(turns, teacher):
        end = turn.start + len(turn.token_ids)
        if end > max_length:
            break
        positions += range(turn.start, end)
        lps += lp
        steps += [turn.step] * len(turn.token_ids)
        segments += turn.segments
        cut = end
    if not positions:
        return None
    return OpdExample(key, full[:cut], positions, lps, [], steps, segments)


# ----------------------------------------------------------------------------- the model

def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast as the SFT stage trains (``TrainConfig.precision``; auto: where the CPU or GPU multiplies
    bf16 natively), else float32."""
    from devices.precision import resolve_dtype

    if resolve_dtype(precision, device.type) == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def load_student(base_model: str, adapter: Path, device: torch.device) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer): the de-quantised base with the trainable ``adapter``, in eval mode (no dropout)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent_runtime.backends.transformers_backend import hf_folder
    from models.resolve import resolve_model

    folder = hf_folder(resolve_model(base_model))
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


def token_logprobs(model, example: OpdExample, device: torch.device, precision: str = "auto") -> torch.Tensor:
    """log π(x_t | x_<t) of the example's scored tokens under ``model`` (graph kept when grad is enabled).

    Only the logits that predict scored tokens are computed (``logits_to_keep``): the LM head over a
    152k-token vocabulary would otherwise cost as much as the rest of a 0.5B model for every position."""
    ids = torch.tensor([example.input_ids], device=device)
    positions = torch.tensor(example.positions, device=device)
    with autocast(device, precision):
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=positions - 1).logits[0]
    return logits.float().log_softmax(-1).gather(-1, ids[0, positions].view(-1, 1)).view(-1)


def fill_old_logprobs(model, examples: list[OpdExample], device: torch.device,
                      on_progress: Callable[[int], None] | None = None, precision: str = "auto") -> None:
    """Set each example's ``old``: its log-probs under the sampling adapter (before any update)."""
    with torch.no_grad():
        for index, example in enumerate(examples):
            example.old = token_logprobs(model, example, device, precision).tolist()
            if on_progress:
                on_progress(index + 1)


def opd_loss(logprobs: torch.Tensor, old: torch.Tensor, teacher: torch.Tensor, kl_clip: float,
             baseline: float = 0.0, trained: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The summed per-token loss of one episode (see the module docstring) and its statistics, over the
    tokens ``trained`` marks (a bool tensor; None: all)."""
    if trained is not None:
        logprobs, old, teacher = logprobs[trained], old[trained], teacher[trained]
    log_ratio = teacher - old
    advantage = log_ratio.clamp(-kl_clip, kl_clip) - baseline
    loss = -(advantage * torch.exp(logprobs - old)).sum()
    stats = {"tokens": int(old.numel()), "kl_sum": float(-log_ratio.sum()),
             "clipped": int((log_ratio.abs() > kl_clip).sum())}
    return loss, stats


def trained_tokens(example: OpdExample, cfg: OpdConfig) -> list[bool]:
    """Which of the example's scored tokens carry loss: all but the stop marker's when it is masked."""
    return [cfg.stop_marker == "scored" or segment != "stop" for segment in example.segments]


def step_baseline(examples: list[OpdExample], batch: list[int], cfg: OpdConfig) -> float:
    """The baseline b of one optimizer step over the episodes ``batch`` (see the module docstring)."""
    if cfg.baseline == "none":
        return 0.0
    advantages = [max(-cfg.kl_clip, min(cfg.kl_clip, t - o))
                  for i in batch
                  for t, o, keep in zip(examples[i].teacher, examples[i].old, trained_tokens(examples[i], cfg),
                                        strict=True) if keep]
    return sum(advantages) / max(len(advantages), 1)


def train_iteration(model, examples: list[OpdExample], cfg: OpdConfig, iteration: int, device: torch.device,
                    on_step: Callable[[int, int], None] | None = None, precision: str = "auto") -> list[dict]:
    """``cfg.epochs`` passes of reverse-KL updates over ``examples`` (their ``old`` filled); one loss row per
    optimizer step: step, loss, kl (mean k1 estimate on the step's tokens under π_old), tokens, clipped,
    baseline (the b subtracted)."""
    generator = torch.Generator().manual_seed(cfg.seed + iteration)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    order = [i for _ in range(cfg.epochs) for i in torch.randperm(len(examples), generator=generator).tolist()]
    batches = [order[i:i + cfg.episodes_per_step] for i in range(0, len(order), cfg.episodes_per_step)]
    rows = []
    for step, batch in enumerate(batches, start=1):
        started = time.perf_counter()
        masks = {i: torch.tensor(trained_tokens(examples[i], cfg), device=device) for i in batch}
        total = max(sum(int(masks[i].sum()) for i in batch), 1)
        baseline = step_baseline(examples, batch, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss_sum, kl_sum, clipped = 0.0, 0.0, 0
        for i in batch:
            example = examples[i]
            logprobs = token_logprobs(model, example, device, precision)
            loss, stats = opd_loss(logprobs, torch.tensor(example.old, device=device),
                                   torch.tensor(example.teacher, device=device), cfg.kl_clip, baseline,
                                   masks[i])
            (loss / total).backward()
            loss_sum += float(loss.detach())
            kl_sum += stats["kl_sum"]
            clipped += stats["clipped"]
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"opd iteration {iteration}, step {step}: the loss is {loss_sum}")
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        rows.append({"iteration": iteration, "step": step, "loss": loss_sum / total, "kl": kl_sum / total,
                     "tokens": total, "clipped": clipped, "baseline": baseline, "episodes": len(batch),
                     "step_time_s": time.perf_counter() - started})
        if on_step:
            on_step(step, len(batches))
    return rows


def mean_kl(model, examples: list[OpdExample], device: torch.device, precision: str = "auto") -> float:
    """Mean over tokens of log π_θ − log π_T on the examples' tokens (the k1 reverse-KL estimate)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            lp = token_logprobs(model, example, device, precision)
            total += float((lp - torch.tensor(example.teacher, device=device)).sum())
            count += lp.numel()
    return total / max(count, 1)

