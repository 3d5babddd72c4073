"""``kind: auto``: the engine measured fastest for a model on this machine's kind.

The choice is a table of measurements (``bench/teacher_engine.py``, committed under ``results/bench/`` and in
the README's Benchmarks), not a guess: for each model, on each CPU kind (``devices.precision.cpu_kind``), the
engine with the most agent episodes per second. A model or CPU kind that was not measured gets llama.cpp,
the engine measured fastest on the AVX2 kind and the project's default before; a GPU gets vLLM where it is
importable (else transformers).

Measured (the 1.5B teacher, 8 agent episodes, episodes/s):
- AVX-512 BF16 (2-core AMD EPYC, Zen 4 class): transformers bf16 0.279, vLLM bf16 0.271, llama.cpp 0.221 (8 slots).
- AMX (2-core Sapphire Rapids Xeon): transformers bf16 164 s, llama.cpp 262 s for the same 8 episodes.
- AVX2 (2-core AMD EPYC): llama.cpp 2.3-2.7x transformers float32.
"""

from __future__ import annotations

import logging

from agent_runtime.backends import BackendConfig

logger = logging.getLogger(__name__)

# model spec -> CPU kind -> the engine measured fastest there (only measured pairs; see the module docstring).
FASTEST: dict[str, dict[str, str]] = {
    "qwen2.5-coder-1.5b-instruct": {"amx": "transformers", "avx512-bf16": "transformers", "avx2": "llamacpp"},
}
UNMEASURED = "llamacpp"


def choose_engine(model: str, cpu_kind: str, gpu: bool, vllm: bool) -> tuple[str, str]:
    """(engine, why) for ``model`` on a machine with ``cpu_kind``, a CUDA GPU or not, vLLM importable or not."""
    if gpu:
        return ("vllm", "a GPU, vLLM installed") if vllm else ("transformers", "a GPU, vLLM not installed")
    measured = FASTEST.get(model, {}).get(cpu_kind)
    if measured:
        return measured, f"measured fastest for {model} on the {cpu_kind} CPU kind"
    return UNMEASURED, f"not measured for {model} on the {cpu_kind} CPU kind: llama.cpp, the default"


def this_machine() -> tuple[str, bool, bool]:
    """(CPU kind, a CUDA GPU present, vLLM importable) of this machine."""
    import importlib.util

    import torch

    from devices.precision import cpu_kind

    return cpu_kind(), torch.cuda.is_available(), importlib.util.find_spec("vllm") is not None


def resolve_engine(cfg: BackendConfig) -> BackendConfig:
    """``cfg`` with ``kind: auto`` replaced by the engine chosen for this machine (any other kind: ``cfg``)."""
    if cfg.kind != "auto":
        return cfg
    kind, gpu, vllm = this_machine()
    engine, why = choose_engine(cfg.model, kind, gpu, vllm)
    logger.info("engine auto for %s: %s (%s)", cfg.model, engine, why)
    return cfg.model_copy(update={"kind": engine})
