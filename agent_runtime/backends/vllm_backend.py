"""In-process vLLM backend (GPU): offline batching with ``vllm.LLM``, LoRA through ``LoRARequest``.

Prompts are rendered here with the model's chat template (the same ``prompt_ids`` as the transformers
backend, so ``continue_final`` behaves identically) and passed as token ids. Every (request, sample j)
is one vLLM sequence with ``seed=sample_seed(request, sampling, j)``: vLLM schedules them together and
its prefix cache shares the prompt, and each sample is reproducible on its own. With temperature 0 a
request is decoded once and repeated ``n`` times. A GGUF model spec is served from the de-quantised
Hugging Face folder (see ``transformers_backend.dequantized_folder``), which vLLM loads natively.

Latency: ``latency_s`` is the wall time of the ``LLM.generate`` call divided by the sequences in it.
vllm is imported when the backend is built; without it a ``GenerationError`` says how to install it.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from agent_runtime.backends import BackendConfig
from agent_runtime.backends.transformers_backend import dequantized_folder, prompt_ids, repeat_completion
from agent_runtime.generation import Completion, Generation, GenerationError, Request, Sampling, sample_seed
from devices.precision import resolve_dtype
from models.resolve import resolve_model

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for max_lora_rank


class VLLMGenerator:
    """``Generator`` over an in-process ``vllm.LLM``: one engine per base model, its adapters through LoRARequest.

    The engine serves ``cfg.adapter`` and ``adapters`` (PEFT folders); ``for_adapter`` gives the generator
    of one of them (or of the base model) on the same engine, so a base and its students share its memory.
    """

    def __init__(self, cfg: BackendConfig, adapters: tuple[str, ...] = ()):
        try:
            from vllm import LLM
            from vllm.lora.request import LoRARequest
        except ImportError as exc:
            raise GenerationError(
                f"the vllm backend needs the vllm package (GPU only): pip install 'distillery[gpu]' ({exc})"
            ) from exc
        self.cfg = cfg
        self.name = f"vllm:{cfg.model}" + (f"+{cfg.adapter}" if cfg.adapter else "")
        src = resolve_model(cfg.model)
        folder = dequantized_folder(src) if src.gguf_file else src.path
        served = [str(Path(a).resolve()) for a in (cfg.adapter, *adapters) if a is not None]
        served = list(dict.fromkeys(served))
        # vLLM tells adapters apart by name and id: the folder and its 1-based position.
        self.lora_requests = {path: LoRARequest(path, number, path) for number, path in enumerate(served, 1)}
        self.lora_request = self.lora_requests[served[0]] if cfg.adapter is not None else None
        lora = {}
        if served:
            lora = {"enable_lora": True, "max_loras": len(served),
                    "max_lora_rank": max(lora_rank_limit(Path(path)) for path in served)}
        self.llm = LLM(
            model=str(folder),
            dtype=resolve_dtype(cfg.dtype, "cuda"),
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=cfg.max_model_len,
            **lora,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def for_adapter(self, adapter: str | None) -> VLLMGenerator:
        """The generator of ``adapter`` (None: the base model) on this engine; the engine's owner closes it."""
        view = copy.copy(self)
        view.lora_request = self.lora_requests[str(Path(adapter).resolve())] if adapter is not None else None
        view.name = f"vllm:{self.cfg.model}" + (f"+{adapter}" if adapter else "")
        return view

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Generation]:
        """One Generation of ``sampling.n`` completions per request, in order."""
        from vllm import SamplingParams

        if not requests:
            return []
        prompts = [prompt_ids(self.tokenizer, index, request) for index, request in enumerate(requests)]
        distinct = 1 if sampling.temperature == 0 else sampling.n
        rows = [(i, j) for i in range(len(requests)) for j in range(distinct)]
        params = [
            SamplingParams(**sampling_kwargs(sampling, sample_seed(requests[i], sampling, j)))
            for i, j in rows
        ]
        started = time.perf_counter()
        outputs = self.llm.generate(
            [{"prompt_token_ids": prompts[i]} for i, _ in rows],
            params,
            lora_request=self.lora_request,
            use_tqdm=False,
        )
        share = (time.perf_counter() - started) / len(rows)
        done = {row: to_completion(output, share) for row, output in zip(rows, outputs)}
        if distinct == sampling.n:
            return [Generation([done[i, j] for j in range(sampling.n)]) for i in range(len(requests))]
        return [Generation(repeat_completion(done[i, 0], sampling.n)) for i in range(len(requests))]

    def close(self) -> None:
        """Drop the engine so its GPU memory can be freed."""
        del self.llm


def sampling_kwargs(sampling: Sampling, seed: int) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` for one sequence of ``sampling``."""
    return {
        "n": 1,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_new_tokens,
        "stop": list(sampling.stop) or None,
        "seed": seed,
    }


def to_completion(output, latency_s: float) -> Completion:
    """A Completion from a ``vllm.RequestOutput`` with one sequence (vLLM already cut the stop string)."""
    sequence = output.outputs[0]
    # stop_reason is the matched stop string, an EOS token id (int), or None.
    stop = sequence.stop_reason if isinstance(sequence.stop_reason, str) else None
    return Completion(
        text=sequence.text,
        prompt_tokens=len(output.prompt_token_ids),
        completion_tokens=len(sequence.token_ids),
        finish_reason="length" if sequence.finish_reason == "length" else "stop",
        latency_s=latency_s,
        stop=stop,
    )


def lora_rank_limit(adapter: Path) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds this PEFT adapter's rank."""
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise GenerationError(
            f"adapter folder {adapter} has no adapter_config.json (expected a PEFT adapter)"
        )
    rank = json.loads(config_file.read_text())["r"]
    fitting = [limit for limit in VLLM_LORA_RANKS if limit >= rank]
    if not fitting:
        raise GenerationError(
            f"{config_file}: LoRA rank {rank} exceeds vLLM's largest ({VLLM_LORA_RANKS[-1]})"
        )
    return fitting[0]
