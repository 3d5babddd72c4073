"""In-process transformers backend: a base model (plus an optional PEFT LoRA adapter) on CPU or GPU.

Batching: every request × sample becomes one row; rows are sorted by prompt length and cut into chunks
of ``batch_size``; each chunk is decoded together by ``_decode``, a plain KV-cache loop (the same
forward passes ``generate()`` makes) with two things generate() does not do:

- *shared-prefix prefill*: the tokens every prompt of the chunk starts with (the system prompt with its
  tool descriptions and few-shot examples, ~1,200 tokens for the teacher) are run once and their KV cache
  is repeated over the rows; each row then prefills only its own suffix. The left padding sits between
  the prefix and the suffix, masked, and position ids skip it, so a row sees exactly what it would see
  alone. Only the last position's logits are computed.
- *finished rows leave the batch*: a row that emits EOS or one of the stop strings is dropped from the
  cache and the batch at once, so the remaining rows do not pay for it.

Seeds: each row samples with its own ``torch.Generator`` seeded by ``sample_seed(request, sampling, j)``
(``RowSampler`` below draws the token). So the same (request seed, sampling, sample index) gives the
same text whatever else shares the batch, up to the rounding differences that different padding can
cause (float32 CPU: none seen in the tests). With temperature 0 a request is decoded once (argmax) and
its completion repeated ``n`` times.

Latency: ``latency_s`` of a completion is the wall time of the chunk that produced it divided by the
rows in that chunk, so the latencies of a batch add up to its wall time.

GGUF models (the embedded SmolLM2) are de-quantised by transformers at load, which is slow (~30 s for
135M parameters). The de-quantised float32 weights and the tokenizer are cached as a plain Hugging Face
folder under ``$XDG_CACHE_HOME/distillery/dequantized/<gguf name>-<content hash>`` (default
``~/.cache``), so later loads read safetensors instead; ``dequantized_folder`` builds it atomically.
"""

from __future__ import annotations

import functools
import hashlib
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from agent_runtime.backends import BackendConfig
from agent_runtime.generation import (
    Completion,
    Generation,
    GenerationError,
    Request,
    Sampling,
    Scored,
    cut_at_stop,
    sample_seed,
)
from common.files import atomic_dir, cache_dir
from devices.precision import resolve_dtype
from models.resolve import ModelSource, resolve_model

# Prompt tokens decoded together with the continuation, so tokenizers that drop a leading space on the
# first decoded token (SentencePiece) still return "Thought: I| am" as " am".
DECODE_OVERLAP_TOKENS = 4
# A common prompt start at least this long is prefilled once and its KV cache shared by the rows.
MIN_SHARED_PREFIX = 16


class TransformersGenerator:
    """``Generator`` over a transformers causal LM, batched with left padding."""

    def __init__(self, cfg: BackendConfig):
        self.cfg = cfg
        self.name = f"transformers:{cfg.model}" + (f"+{cfg.adapter}" if cfg.adapter else "")
        self.device = resolve_device(cfg.device)
        self.dtype = torch_dtype(cfg.dtype, self.device)
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

    def score(self, requests: list[Request], completions: list[str]) -> list[Scored]:
        """The log-probs of each given completion after its request's prompt (see ``Scored``): one forward
        pass per chunk of ``batch_size`` rows, left-padded so every row's completion ends at the right edge
        and only the last positions' logits are computed."""
        rows = [score_ids(self.tokenizer, i, r, c) for i, (r, c) in enumerate(paired(requests, completions))]
        scored = []
        for start in range(0, len(rows), self.cfg.batch_size):
            chunk = rows[start : start + self.cfg.batch_size]
            with torch.inference_mode():
                scored.extend(self._score_rows(chunk))
        return scored

    def _score_rows(self, rows: list[tuple[list[int], list[int]]]) -> list[Scored]:
        ids, mask = left_pad([prompt + tokens for prompt, tokens in rows], self.tokenizer.pad_token_id,
                             self.device)
        longest = max(len(tokens) for _, tokens in rows)
        # Position -1 - k predicts the token k places before the right edge; the last position predicts
        # nothing given, so the logits of the last longest + 1 positions cover every row's completion.
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            logits_to_keep=longest + 1,
        ).logits[:, :-1]
        scored = []
        for row, (_, tokens) in enumerate(rows):
            if not tokens:
                scored.append(Scored([], []))
                continue
            given = torch.tensor(tokens, device=self.device)
            # One row at a time in float32: the whole chunk's log-softmax over a 152k vocabulary would hold
            # rows x positions x vocabulary floats twice over (~10 GB for 32 rows of 256 tokens).
            logprobs = logits[row, longest - len(tokens) :].float().log_softmax(-1)
            scored.append(Scored(list(tokens), logprobs.gather(-1, given.view(-1, 1)).view(-1).tolist()))
            del logprobs
        return scored

    def close(self) -> None:
        """Drop the model so its memory can be freed."""
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _generate_rows(
        self, prompts: list[list[int]], seeds: list[int], sampling: Sampling
    ) -> list[Completion]:
        """Decode these rows together; returns one Completion per row."""
        started = time.perf_counter()
        with torch.inference_mode():
            rows = self._decode(prompts, seeds, sampling)
        share = (time.perf_counter() - started) / len(prompts)
        return [
            self._completion(prompt, tokens, stopped_at, sampling, share)
            for prompt, (tokens, stopped_at) in zip(prompts, rows)
        ]

    def _decode(
        self, prompts: list[list[int]], seeds: list[int], sampling: Sampling
    ) -> list[tuple[list[int], int | None]]:
        """The decoding loop: shared-prefix prefill, then one token per live row per step.

        Returns each row's new tokens and, when a stop string ended it, the token count at that point.
        """
        count = len(prompts)
        cache = preallocated_cache(self.model, max(map(len, prompts)) + sampling.max_new_tokens)
        shared = shared_prefix_length(prompts) if count > 1 else 0
        if shared >= MIN_SHARED_PREFIX:  # the system prompt (and few-shot examples) once, not per row
            prefix = torch.tensor([prompts[0][:shared]], dtype=torch.long, device=self.device)
            self.model(input_ids=prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(count)
        else:
            shared = 0
        ids, suffix_mask = left_pad([p[shared:] for p in prompts], self.tokenizer.pad_token_id, self.device)
        # The padding sits between the shared prefix and each row's own suffix; positions skip it.
        mask = torch.cat([torch.ones((count, shared), dtype=torch.long, device=self.device), suffix_mask], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions[:, shared:],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        sampler = None
        if sampling.temperature > 0:
            sampler = RowSampler(seeds, sampling.temperature, sampling.top_p, self.device)
        stops = StopChecker(self.tokenizer, sampling.stop, self.eos_ids)
        new: list[list[int]] = [[] for _ in prompts]
        stopped_at: list[int | None] = [None] * count
        live = list(range(count))  # original row of each batch position still decoding
        for step in range(sampling.max_new_tokens):
            drawn = sampler.draw(live, logits) if sampler else logits.argmax(dim=-1)
            keep = []
            for position, (row, token) in enumerate(zip(live, drawn.tolist())):
                new[row].append(token)
                verdict = stops.check(new[row])
                if verdict == "string":
                    stopped_at[row] = len(new[row])
                elif verdict is None:
                    keep.append(position)
            if not keep or step == sampling.max_new_tokens - 1:
                break
            if len(keep) < len(live):  # finished rows leave the batch: no compute is spent on them
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, drawn = mask[index], drawn[index]
                live = [live[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], 1)
            logits = self.model(
                input_ids=drawn.view(-1, 1),
                attention_mask=mask,
                position_ids=mask.sum(-1, keepdim=True) - 1,
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
        return list(zip(new, stopped_at))

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


class RowSampler:
    """Draw each row's next token with that row's own seeded generator (temperature, then top-p).

    A shared generator would make a row's sample depend on the other rows of the batch.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def draw(self, rows: list[int], scores: torch.Tensor) -> torch.Tensor:
        """One token per batch position; position k belongs to row ``rows[k]`` (its generator draws)."""
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            probs = top_p_filter(probs, self.top_p)
        return torch.cat(
            [torch.multinomial(probs[k], 1, generator=self.generators[row]) for k, row in enumerate(rows)]
        )


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches ``top_p`` (per row)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always survives
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


class StopChecker:
    """Whether a row is finished: ``"eos"`` (it emitted an end-of-turn token), ``"string"`` (its new text
    contains a stop string) or None. Only the last few new tokens are decoded per check, so a step costs
    O(rows), not O(length). Only generated text is searched: a stop string straddling a continued prefix
    and the new text is not seen."""

    def __init__(self, tokenizer, stop: tuple[str, ...], eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.eos_ids = eos_ids
        # A stop string of L characters spans at most L tokens (+2 for a token straddling each end).
        self.window = max((len(s) for s in stop), default=0) + 2

    def check(self, new: list[int]) -> str | None:
        if new[-1] in self.eos_ids:
            return "eos"
        if self.stop:
            tail = self.tokenizer.decode(new[-self.window :], skip_special_tokens=True)
            if any(s in tail for s in self.stop):
                return "string"
        return None


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer that writes into a buffer sized for the whole decode instead of concatenating.

    ``DynamicLayer.update`` copies the layer's entire cache on every token (``torch.cat``); with a long
    shared prompt repeated over a batch that copy costs more than the attention itself. Here a step writes
    only its new positions; ``keys``/``values`` are views of the filled part.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            shape = (*key_states.shape[:2], max(self.capacity, key_states.shape[-2]), key_states.shape[-1])
            self._keys, self._values = key_states.new_empty(shape), value_states.new_empty(shape)
            self.length = 0
            self.is_initialized = True
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:  # more than planned: grow (rare; keeps correctness)
            grow = (0, 0, 0, end - self._keys.shape[-2])
            self._keys = torch.nn.functional.pad(self._keys, grow)
            self._values = torch.nn.functional.pad(self._values, grow)
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        return self._views()

    def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._views()


def preallocated_cache(model: PreTrainedModel, capacity: int) -> DynamicCache:
    """A DynamicCache whose full-attention layers are ``PreallocatedLayer``s of ``capacity`` positions;
    models with other layer kinds (sliding windows, linear attention) keep their default layers."""
    cache = DynamicCache(config=model.config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens all prompts start with, leaving every prompt at least one token of its own to prefill."""
    shortest = min(len(p) for p in prompts)
    first = prompts[0]
    length = 0
    while length < shortest - 1 and all(p[length] == first[length] for p in prompts):
        length += 1
    return length


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


def score_ids(tokenizer, index: int, request: Request, completion: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one scored pair: the prompt ``generate`` would decode from, and the
    completion text tokenized alone (no special tokens), as ``Scored`` documents."""
    return prompt_ids(tokenizer, index, request), tokenizer(completion, add_special_tokens=False).input_ids


def paired(requests: list[Request], completions: list[str]) -> zip:
    """``zip(requests, completions)``, refusing lists of different lengths (one completion per request)."""
    if len(requests) != len(completions):
        raise ValueError(f"score needs one completion per request, got {len(requests)} requests and "
                         f"{len(completions)} completions")
    return zip(requests, completions)


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


def torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype that ``dtype`` means on ``device`` (``devices.precision.resolve_dtype``)."""
    return getattr(torch, resolve_dtype(dtype, device.type))


def load_model(
    src: ModelSource, device: torch.device, dtype: torch.dtype, adapter: str | None
) -> tuple[PreTrainedModel, object]:
    """Load (model, tokenizer) from local files; a GGUF goes through the de-quantised cache folder."""
    folder = hf_folder(src)
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


def hf_folder(src: ModelSource) -> Path:
    """A Hugging Face folder of ``src``: its own, or for a GGUF the de-quantised cache (built on first use).

    Reading a GGUF costs much more than the folder: transformers parses its metadata field by field (the
    Qwen2.5 tokenizer's 151k-entry vocabulary alone takes ~17 s on a 2-core AVX2 CPU) and de-quantises every
    tensor, at each load; the folder loads in seconds."""
    return dequantized_folder(src) if src.gguf_file else src.path


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
    with atomic_dir(folder, replace=False) as temp:  # another process that finished first keeps its copy
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
    return folder


def dequantized_path(src: ModelSource) -> Path:
    """Where ``dequantized_folder`` keeps ``src``'s GGUF, named by the GGUF's content hash."""
    gguf = src.path / src.gguf_file
    stat = gguf.stat()
    return cache_dir() / "dequantized" / f"{gguf.stem}-{_content_digest(gguf, stat.st_size, stat.st_mtime_ns)}"


@functools.lru_cache(maxsize=16)
def _content_digest(path: Path, size: int, mtime_ns: int) -> str:
    """The first 16 hex digits of the file's SHA-256, hashed once per process for a given size and mtime
    (a training run asks for its base's tokenizer and then its weights: 0.45 s of hashing each for the 0.5B)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def load_tokenizer(src: ModelSource):
    """Just the tokenizer. For a GGUF: from the de-quantised cache when it exists, else from a tokenizer-only
    cache beside it (written on first use, atomically), so the GGUF's metadata is parsed once per machine."""
    if not src.gguf_file:
        return AutoTokenizer.from_pretrained(src.path)
    folder = dequantized_path(src)
    if (folder / "config.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    cached = folder.with_name(folder.name + "-tokenizer")
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    with atomic_dir(cached, replace=False) as temp:  # another process that finished first keeps its copy
        tokenizer.save_pretrained(temp)
    return tokenizer


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
