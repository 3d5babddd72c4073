"""Convert a PEFT LoRA adapter (trained on transformers) into a GGUF LoRA adapter for llama.cpp.

A PEFT adapter holds, per adapted linear layer ``model.layers.N.<module>``, ``lora_A`` ([r, in]) and
``lora_B`` ([out, r]); the layer computes ``W x + (alpha / r) B A x``. llama.cpp reads the same pair
from a GGUF file whose ``general.type`` is ``adapter``, under the base GGUF's tensor names with the
suffixes ``.lora_a`` / ``.lora_b``, and scales by ``adapter.lora.alpha / r``. So the conversion renames
tensors with gguf's own HF → GGUF name map and copies them, with two exceptions:

- llama-architecture GGUFs store ``q_proj``/``k_proj`` weights with their rows permuted for llama.cpp's
  rotary layout (transformers undoes it when it loads such a GGUF), so ``lora_B`` of those layers gets
  the same row permutation; Qwen2 GGUFs keep the Hugging Face layout;
- rank-stabilised LoRA scales by ``alpha / sqrt(r)``, written as the equivalent ``alpha * sqrt(r)``.

``gguf_adapter_for`` converts once per (adapter, base file) into the model cache and re-uses the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from common.files import atomic_file
from models.gguf_header import read_header
from models.split_gguf import model_cache

PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """A LoRA adapter folder that cannot be converted for this base model."""


def _base_info(base_gguf: Path) -> dict:
    try:
        header = read_header(base_gguf)
    except (ValueError, OSError) as exc:
        raise AdapterError(f"{base_gguf}: not a readable GGUF ({exc})") from None
    values = header.values
    arch = values.get("general.architecture")
    try:
        return {
            "arch": arch,
            "blocks": int(values[f"{arch}.block_count"]),
            "heads": int(values[f"{arch}.attention.head_count"]),
            "kv_heads": int(values.get(f"{arch}.attention.head_count_kv") or values[f"{arch}.attention.head_count"]),
            "tensors": header.tensors,
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterError(f"{base_gguf}: its header lacks {exc} (architecture {arch!r})") from None


def permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp's llama GGUFs use for q/k projections (pairs of rotary halves interleaved)."""
    out = rows.shape[0]
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def convert(adapter_dir: Path, base_gguf: Path, out_path: Path) -> Path:
    """Write the GGUF LoRA adapter of ``adapter_dir`` for ``base_gguf`` to ``out_path`` (atomically)."""
    import gguf
    from safetensors.numpy import load_file

    config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise AdapterError(f"{adapter_dir} is not a PEFT LoRA adapter folder: {needed.name} is missing")
    try:
        config = json.loads(config_file.read_text())
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"{config_file}: not a LoRA adapter config ({exc})") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_file}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_rslora"):
        alpha *= math.sqrt(rank)
    try:
        weights = load_file(weights_file)
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise AdapterError(f"{weights_file}: not a readable safetensors file ({exc})") from exc

    base = _base_info(base_gguf)
    arch_enum = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[base["arch"]]
    names = gguf.get_tensor_name_map(arch_enum, base["blocks"])
    tensors: dict[str, np.ndarray] = {}
    for key, value in sorted(weights.items()):
        module, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise AdapterError(f"{weights_file}: tensor {key!r} is not a lora_A/lora_B weight "
                               "(modules_to_save and DoRA cannot be served by llama.cpp)")
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None or target not in base["tensors"]:
            raise AdapterError(f"{weights_file}: {module!r} has no tensor in {base_gguf.name} ({base['arch']})")
        value = value.astype(np.float32)
        if part == "B.weight" and base["arch"] == "llama" and module.endswith(("q_proj", "k_proj")):
            value = permute_rows(value, base["heads"] if module.endswith("q_proj") else base["kv_heads"])
        out_rows, in_cols = base["tensors"][target][:2]
        expected = (rank, in_cols) if part == "A.weight" else (out_rows, rank)
        if value.shape != expected:
            raise AdapterError(f"{weights_file}: {key} has shape {value.shape}, {base_gguf.name} needs {expected}")
        tensors[f"{target}.lora_{part[0].lower()}"] = value
    if not tensors:
        raise AdapterError(f"{weights_file} holds no LoRA tensors")

    with atomic_file(out_path) as partial:
        writer = gguf.GGUFWriter(partial, base["arch"])
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", alpha)
        for name, value in tensors.items():
            writer.add_tensor(name, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out_path


def gguf_adapter_for(adapter_dir: Path, base_gguf: Path) -> Path:
    """The GGUF form of ``adapter_dir`` for ``base_gguf``, converted on first use into the model cache."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        path = adapter_dir / name
        if not path.is_file():
            raise AdapterError(f"{adapter_dir} is not a PEFT LoRA adapter folder: {name} is missing")
        digest.update(path.read_bytes())
    stat = base_gguf.stat()
    digest.update(f"{base_gguf.name}:{stat.st_size}".encode())
    out_path = model_cache() / "adapters" / f"{digest.hexdigest()[:20]}.gguf"
    return out_path if out_path.is_file() else convert(adapter_dir, base_gguf, out_path)
