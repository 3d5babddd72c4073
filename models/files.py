"""Model files checked before a stage loads them: a GGUF file, a PEFT adapter folder, a safetensors file.

Each failure is a ``ModelNotAvailable`` (a user error) naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
from pathlib import Path

from models.resolve import ModelNotAvailable

GGUF_MAGIC = b"GGUF"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_gguf(path: Path) -> None:
    """``path`` is a complete GGUF file: its magic, then every tensor inside the file (gguf's own reader)."""
    with path.open("rb") as handle:
        head = handle.read(4)
    if head != GGUF_MAGIC:
        raise ModelNotAvailable(f"{path}: not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})")
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except (ValueError, IndexError, OSError) as exc:
        raise ModelNotAvailable(f"{path}: truncated or corrupt GGUF file ({exc})") from None


def check_adapter(folder: Path) -> None:
    """``folder`` is a PEFT adapter: a JSON ``adapter_config.json`` and a whole weights file."""
    if not folder.is_dir():
        raise ModelNotAvailable(f"adapter folder {folder} does not exist")
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise ModelNotAvailable(f"adapter folder {folder} has no adapter_config.json (not a PEFT adapter)")
    try:
        fields = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelNotAvailable(f"{config}: not valid JSON ({exc})") from None
    if not isinstance(fields, dict) or "peft_type" not in fields:
        raise ModelNotAvailable(f"{config}: not a PEFT adapter config (no 'peft_type')")
    weights = [folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()]
    if not weights:
        raise ModelNotAvailable(f"adapter folder {folder} has no weights ({' or '.join(ADAPTER_WEIGHTS)})")
    if weights[0].suffix == ".safetensors":
        check_safetensors(weights[0])


def check_safetensors(path: Path) -> None:
    """The file's JSON header parses and the tensors it lists end exactly at the end of the file."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        if size < 8 or header_size > size - 8:
            raise ModelNotAvailable(f"{path}: truncated safetensors file ({size} bytes)")
        try:
            header = json.loads(handle.read(header_size))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                      default=0)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError) as exc:
            raise ModelNotAvailable(f"{path}: corrupt safetensors header ({exc})") from None
    if 8 + header_size + end != size:
        raise ModelNotAvailable(f"{path}: truncated or padded safetensors file ({size} bytes, the header "
                                f"lists {8 + header_size + end})")
