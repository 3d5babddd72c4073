"""Process-wide handles to loaded models and indexes.

Tasks pass references, never models; a task that needs a model asks here, so one flow run (one
process) loads each model and each index once however many tasks use it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field

from agent_runtime.backends import BackendConfig, make_generator
from agent_runtime.generation import Generator
from retrieval.index import IndexConfig
from storage.store import ArtifactRef

_lock = threading.Lock()


class SearchConfig(BaseModel):
    """Where the agents' ``web_search`` tool gets passages from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    top_k: int = Field(3, ge=1, description="passages per web_search call")
    url: str | None = Field(None, description="a Search-R1-compatible retrieval server instead of the local index")


@lru_cache(maxsize=2)
def _generator(cfg: BackendConfig) -> Generator:
    return make_generator(cfg)


def generator_for(cfg: BackendConfig) -> Generator:
    """The loaded backend for ``cfg`` (loaded at most once per process while it stays in the cache)."""
    with _lock:
        return _generator(cfg)


@lru_cache(maxsize=2)
def _retriever(index_path: str, cfg: IndexConfig):
    from pathlib import Path

    from retrieval.index import load_index

    return load_index(Path(index_path), cfg.embedder, device=cfg.device, precision=cfg.precision, use_gpu=cfg.use_gpu,
                      gpu_fp16=cfg.gpu_fp16, gpu_shard=cfg.gpu_shard, nprobe=cfg.nprobe, ef_search=cfg.ef_search)


def search_for(index: ArtifactRef | None, index_cfg: IndexConfig, cfg: SearchConfig) -> Callable[[str], str]:
    """The agent's ``web_search(query) -> str``: the remote retriever when ``cfg.url`` is set, else the index."""
    from retrieval.retriever import HttpRetriever, web_search

    if cfg.url:
        backend = HttpRetriever(cfg.url)
    elif index is not None:
        with _lock:
            backend = _retriever(str(index.path), index_cfg)
    else:
        raise ValueError("web_search needs an index artifact or a retriever url")
    return lambda query: web_search(backend, query, k=cfg.top_k)
