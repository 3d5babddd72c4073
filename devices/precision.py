"""The one precision policy of every model: inference backends, the embedder and LoRA training.

One vocabulary, torch's dtype names: ``auto``, ``float32``, ``bfloat16``, ``float16``. ``auto`` is
bfloat16 on a GPU and on a CPU that multiplies bfloat16 natively (AVX-512 BF16 or AMX: 2.3-3x the float32
speed of decoding, embedding and training on the development machine), else float32, because other CPUs
emulate bfloat16 slowly. The embedder uses float16 on a GPU instead (``gpu="float16"``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), making bf16 faster than fp32."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_kind(cpuinfo: str = "/proc/cpuinfo") -> str:
    """This CPU's kind as far as the engines care: ``amx`` (AMX tiles, with AVX-512 BF16), ``avx512-bf16``,
    ``avx512`` (no native bf16), ``avx2``, or ``other`` (read from /proc/cpuinfo's flags; ``other`` off Linux)."""
    try:
        with open(cpuinfo) as lines:
            flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    except OSError:
        return "other"
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512-bf16"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "other"


def resolve_dtype(dtype: Dtype, device: str, gpu: Dtype = "bfloat16") -> str:
    """The dtype name ``dtype`` means on ``device`` (``cpu``, ``cuda``, ``cuda:1``): ``auto`` is ``gpu`` on a
    GPU, bfloat16 on a CPU with native bf16, else float32; any other value is itself."""
    if dtype != "auto":
        return dtype
    if device != "cpu":
        return gpu
    return "bfloat16" if cpu_has_native_bf16() else "float32"
