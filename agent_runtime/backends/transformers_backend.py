"""In-process transformers backend: a base model (plus an optional PEFT LoRA adapter) on CPU or GPU.

Batching: every request × sample becomes one row; rows are sorted by prompt length and cut into chunks
of ``batch_size``; each chunk is ONE left-padded ``generate()`` call, and a row that emits EOS or one of
the stop strings stops early (the call ends when every row has).

Seeds: each row samples with its own ``torch.Generator`` seeded by ``sample_seed(request, sampling, j)``
(``RowSampler`` below draws the token, generate() runs in greedy mode and takes it). So the same
(request seed, sampling, sample index) gives the same text whatever else shares the batch, up to the
rounding differences that different padding can cause (float32 CPU: none seen in the tests).
With temperature 0 a request is decoded once and its completion repeated ``n`` times.

Latency: ``latency_s`` of a completion is the wall time of the generate() call that produced it divided
by the rows in that call, so the latencies of a batch add up to its wall time.

GGUF models (the embedded SmolLM2) are de-quantised by transformers at load, which is slow (~30 s for
135M parameters). The de-quantised float32 weights and the tokenizer are cached as a plain Hugging Face
folder under ``$XDG_CACHE_HOME/distillery/dequantized/<gguf name>-<content hash>`` (default
``~/.cache``), so later loads read safetensors instead; ``dequantized_folder`` builds it atomically.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
)

from agent_runtime.backends import BackendConfig
from agent_runtime.generation import (
    Completion,
    Generation,
    GenerationError,
    Request,
    Sampling,
    cut_at_stop,
    sample_seed,
)
from storage.models import ModelSource, resolve_model

# Prompt tokens decoded together with the continuation, so tokenizers that drop a leading space on the
# first decoded token (SentencePiece) still return "Thought: I| am" as " am".
DECODE_OVERLAP_TOKENS = 4


class TransformersGenerator:
    """``Generator`` over a transformers causal LM, batched with left padding."""

    def __init__(self, cfg: BackendConfig):
        self.cfg = cfg
        self.name = f"transformers:{cfg.model}" + (f"+{cfg.adapter}" if cfg.adapter else "")
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.model, self.tokenizer = load_model(
            resolve_model(cfg.model), self.device, self.dtype, cfg.adapter
        )
        if self.tokenizer.pad_token_id is None:
            raise GenerationError(f"the tokenizer of {cfg.model!r} has no pad token; left padding needs one")
        self.eos_ids = set(_eos_ids(self.model, self.tokenizer))

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Generation]:
        """One Generation of ``sampling.n`` completions per request, in order (see the module docstring)."""
        prompts = [prompt_ids(self.tokenizer, index, request) for index, request in enumerate(requests)]
        distinct = 1 if sampling.temperature == 0 else sampling.n  # greedy samples would all be equal
        rows = [(i, j) for i in range(len(requests)) for j in range(distinct)]
        rows.sort(key=lambda row: len(prompts[row[0]]), reverse=True)  # similar lengths → little padding
        done: dict[tuple[int, int], Completion] = {}
        for start in range(0, len(rows), self.cfg.batch_size):
            chunk = rows[start : start + self.cfg.batch_size]
            seeds = [sample_seed(requests[i], sampling, j) for i, j in chunk]
            completions = self._generate_rows([prompts[i] for i, _ in chunk], seeds, sampling)
            done.update(zip(chunk, completions))
        if distinct == sampling.n:
            return [Generation([done[i, j] for j in range(sampling.n)]) for i in range(len(requests))]
        return [Generation(repeat_completion(done[i, 0], sampling.n)) for i in range(len(requests))]

    def close(self) -> None:
        """Drop the model so its memory can be freed."""
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _generate_rows(
        self, prompts: list[list[int]], seeds: list[int], sampling: Sampling
    ) -> list[Completion]:
        """One generate() call for these rows; returns one Completion per row."""
        input_ids, attention_mask = left_pad(prompts, self.tokenizer.pad_token_id, self.device)
        stopper = StopOnStrings(self.tokenizer, sampling.stop, self.eos_ids, input_ids.shape)
        processors = LogitsProcessorList()
        if sampling.temperature > 0:
            processors.append(RowSampler(seeds, sampling.temperature, sampling.top_p, self.device))
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=False,  # RowSampler has already drawn the token; greedy just takes it
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([stopper]),
                pad_token_id=self.tokenizer.pad_token_id,
            )
        share = (time.perf_counter() - started) / len(prompts)
        new_tokens = output[:, input_ids.shape[1] :].tolist()
        return [
            self._completion(prompt, tokens, stopper.stopped_at[row], sampling, share)
            for row, (prompt, tokens) in enumerate(zip(prompts, new_tokens))
        ]

    def _completion(
        self,
        prompt: list[int],
        tokens: list[int],
        stopped_at: int | None,
        sampling: Sampling,
        latency_s: float,
    ) -> Completion:
        """Turn one row's new tokens into a Completion (text cut at the first stop string)."""
        if stopped_at is not None:  # a stop string ended the row; later positions are padding
            tokens, finish = tokens[:stopped_at], "stop"
        else:
            eos_at = next((k for k, token in enumerate(tokens) if token in self.eos_ids), None)
            # The EOS token counts as generated (as vLLM and OpenAI count it) but is not text.
            tokens, finish = (tokens, "length") if eos_at is None else (tokens[: eos_at + 1], "stop")
        text, stop = cut_at_stop(self._decode_continuation(prompt, tokens), sampling.stop)
        return Completion(
            text=text,
            prompt_tokens=len(prompt),
            completion_tokens=len(tokens),
            finish_reason="stop" if stop is not None else finish,
            latency_s=latency_s,
            stop=stop,
        )

    def _decode_continuation(self, prompt: list[int], tokens: list[int]) -> str:
        overlap = prompt[-DECODE_OVERLAP_TOKENS:]
        head = self.tokenizer.decode(overlap, skip_special_tokens=True)
        full = self.tokenizer.decode(overlap + tokens, skip_special_tokens=True)
        if full.startswith(head):
            return full[len(head) :]
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


class RowSampler(LogitsProcessor):
    """Draw each row's next token with that row's own seeded generator (temperature, then top-p).

    It returns logits that are -inf except at the drawn token, so generate() in greedy mode picks it.
    A shared generator would make a row's sample depend on the other rows of the batch.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            probs = top_p_filter(probs, self.top_p)
        drawn = torch.cat(
            [torch.multinomial(probs[row], 1, generator=gen) for row, gen in enumerate(self.generators)]
        )
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, drawn.unsqueeze(1), 0.0)
        return forced


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches ``top_p`` (per row)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always survives
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


class StopOnStrings(StoppingCriteria):
    """Per-row stop: a row is done once its new text contains a stop string (or it emitted EOS).

    ``stopped_at[row]`` is the number of new tokens when a stop string appeared (None otherwise). Only the
    last few new tokens are decoded each step, so the check costs O(rows) per step, not O(length). Only
    generated text is searched: a stop string straddling a continued prefix and the new text is not seen.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...], eos_ids: set[int], prompt_shape: torch.Size):
        self.tokenizer = tokenizer
        self.stop = stop
        self.eos_ids = eos_ids
        rows, self.prompt_len = prompt_shape
        # A stop string of L characters spans at most L tokens (+2 for a token straddling each end).
        self.window = max((len(s) for s in stop), default=0) + 2
        self.stopped_at: list[int | None] = [None] * rows
        self.ended: set[int] = set()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len :]
        flags = []
        for row in range(new.shape[0]):
            if row not in self.ended:
                self._check(row, new[row])
            flags.append(row in self.ended)
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

    def _check(self, row: int, new: torch.Tensor) -> None:
        if int(new[-1]) in self.eos_ids:
            self.ended.add(row)
            return
        if not self.stop:
            return
        tail = self.tokenizer.decode(new[-self.window :].tolist(), skip_special_tokens=True)
        if any(s in tail for s in self.stop):
            self.ended.add(row)
            self.stopped_at[row] = new.shape[0]


def prompt_ids(tokenizer, index: int, request: Request) -> list[int]:
    """Token ids of request ``index``'s chat prompt: an open assistant turn, or the continued prefix."""
    if request.continue_final and (not request.messages or request.messages[-1]["role"] != "assistant"):
        raise GenerationError(
            f"request {index}: continue_final needs the last message to be an assistant prefix"
        )
    try:
        text = tokenizer.apply_chat_template(
            request.messages,
            tokenize=False,
            add_generation_prompt=not request.continue_final,
            continue_final_message=request.continue_final,
        )
    except Exception as exc:  # jinja, ValueError, KeyError...: all mean a malformed conversation here
        raise GenerationError(f"request {index}: cannot render the chat template: {exc}") from exc
    # The template already wrote BOS/special tokens; adding them again would double BOS.
    return tokenizer(text, add_special_tokens=False).input_ids


def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (input_ids, attention_mask): decoder-only models extend the right end."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def resolve_device(device: str) -> torch.device:
    """'auto' → cuda if a GPU is visible, else cpu; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' → float32 on CPU (bf16 matmuls are slow there), bfloat16 on GPU."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_model(
    src: ModelSource, device: torch.device, dtype: torch.dtype, adapter: str | None
) -> tuple[PreTrainedModel, object]:
    """Load (model, tokenizer) from local files; a GGUF goes through the de-quantised cache folder."""
    folder = dequantized_folder(src) if src.gguf_file else src.path
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if adapter is not None:
        model = apply_adapter(model, Path(adapter))
    return model.to(device).eval(), tokenizer


def apply_adapter(model: PreTrainedModel, adapter: Path) -> PreTrainedModel:
    """Load a PEFT LoRA adapter and merge it into the weights (merged layers run at base-model speed)."""
    if not (adapter / "adapter_config.json").is_file():
        raise GenerationError(
            f"adapter folder {adapter} has no adapter_config.json (expected a PEFT adapter)"
        )
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def dequantized_folder(src: ModelSource) -> Path:
    """A Hugging Face folder (float32 safetensors + tokenizer) holding the de-quantised ``src`` GGUF.

    Built on first use into a temporary sibling and renamed into place, so a half-written folder is never
    read and two processes building it at once both end with one complete copy.
    """
    folder = dequantized_path(src)
    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
    # The weights are plain float32 after loading; only the GGUF quantizer marker blocks save_pretrained.
    model.hf_quantizer.remove_quantization_config(model)
    temp = folder.parent / f"{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    model.save_pretrained(temp)
    tokenizer.save_pretrained(temp)
    try:
        os.replace(temp, folder)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(temp, ignore_errors=True)
    return folder


def dequantized_path(src: ModelSource) -> Path:
    """Where ``dequantized_folder`` keeps ``src``'s GGUF, named by the GGUF's content hash."""
    gguf = src.path / src.gguf_file
    digest = hashlib.sha256()
    with gguf.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "distillery" / "dequantized"
    return cache / f"{gguf.stem}-{digest.hexdigest()[:16]}"


def load_tokenizer(src: ModelSource):
    """Just the tokenizer: from the de-quantised cache when it exists (fast), else from the GGUF or folder."""
    if src.gguf_file:
        folder = dequantized_path(src)
        if (folder / "config.json").is_file():
            return AutoTokenizer.from_pretrained(folder)
        return AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    return AutoTokenizer.from_pretrained(src.path)


def _eos_ids(model: PreTrainedModel, tokenizer) -> list[int]:
    """Every token id that ends a turn: the generation config's EOS (int or list) and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return [i for i in [*ids, tokenizer.eos_token_id] if i is not None]


def repeat_completion(completion: Completion, n: int) -> list[Completion]:
    """``n`` copies of a greedy completion, each carrying 1/n of its latency (the sum stays the wall time)."""
    share = completion.latency_s / n
    return [
        Completion(
            text=completion.text,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            finish_reason=completion.finish_reason,
            latency_s=share,
            stop=completion.stop,
        )
        for _ in range(n)
    ]
