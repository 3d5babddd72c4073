"""Loaded models and indexes, and who owns them.

Tasks pass references, never models. A stage opens its generators in a block (``open_generators``) and
its tasks take them with ``generator_for``: a model is loaded on first use, shared by the stage's tasks
that run in this process, and closed when the block ends, so a llama.cpp server stops with its stage. A
task outside such a block (an evaluation shard in its own process or on a Dask worker) opens one for
itself, which ends with the task (or with the last task of this process that shares it).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field

from agent_runtime.backends import BackendConfig, make_generator
from agent_runtime.backends.engines import resolve_engine
from agent_runtime.generation import Generator
from retrieval.index import IndexConfig
from storage.store import ArtifactRef

_lock = threading.Lock()


class SearchConfig(BaseModel):
    """Where the agents' ``web_search`` tool gets passages from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    top_k: int = Field(3, ge=1, description="passages per web_search call")
    url: str | None = Field(None, description="a Search-R1-compatible retrieval server instead of the local index")


class Generators:
    """The generators of one stage: loaded on first use, at most ``capacity`` kept, all closed by ``close``.

    When another model is loaded, the least recently used one that no task is using is closed (one in use
    is closed once its task releases it). vLLM serves a base model and its LoRA adapters from one engine:
    the engine of a base is built with every adapter of it that the stage declared (``declare``).
    """

    def __init__(self, backends: Iterable[BackendConfig] = (), capacity: int = 2):
        self.capacity = capacity
        self.loaded: OrderedDict[tuple, Generator] = OrderedDict()
        self.users: Counter[tuple] = Counter()
        self.vllm_adapters: dict[BackendConfig, set[str]] = {}
        self.lock = threading.Lock()
        self.declare(backends)

    def declare(self, backends: Iterable[BackendConfig]) -> None:
        """Backends the stage will use (what lets one vLLM engine be built for all adapters of a base)."""
        with self.lock:
            for cfg in map(resolve_engine, backends):
                if cfg.kind == "vllm" and cfg.adapter is not None:
                    self.vllm_adapters.setdefault(cfg.model_copy(update={"adapter": None}), set()).add(cfg.adapter)

    @contextmanager
    def lease(self, cfg: BackendConfig) -> Iterator[Generator]:
        """The generator of ``cfg`` while the block runs (loaded now unless it is loaded already)."""
        cfg = resolve_engine(cfg)  # kind auto: the engine chosen for this machine
        self.declare([cfg])
        with self.lock:
            key = self.key(cfg)
            if key not in self.loaded:
                self.loaded[key] = load_generator(*key)
            self.loaded.move_to_end(key)
            self.users[key] += 1
            self.evict()
            generator = self.loaded[key]
        try:
            yield generator.for_adapter(cfg.adapter) if cfg.kind == "vllm" else generator
        finally:
            with self.lock:
                self.users[key] -= 1
                self.evict()

    def key(self, cfg: BackendConfig) -> tuple[BackendConfig, tuple[str, ...]]:
        """(config, adapters) of the generator that serves ``cfg``: for vLLM its base's shared engine."""
        if cfg.kind != "vllm":
            return cfg, ()
        base = cfg.model_copy(update={"adapter": None})
        return base, tuple(sorted(self.vllm_adapters.get(base, ())))

    def evict(self) -> None:
        """Close least recently used idle generators while more than ``capacity`` are loaded (holds the lock)."""
        idle = [key for key in self.loaded if not self.users[key]]
        for key in idle[:max(0, len(self.loaded) - self.capacity)]:
            self.loaded.pop(key).close()

    def close(self) -> None:
        with self.lock:
            while self.loaded:
                self.loaded.popitem(last=False)[1].close()


def load_generator(cfg: BackendConfig, adapters: tuple[str, ...]) -> Generator:
    """Load the backend of ``cfg``; a vLLM engine also serves ``adapters`` (LoRARequest)."""
    if cfg.kind == "vllm":
        from agent_runtime.backends.vllm_backend import open_vllm

        return open_vllm(cfg, adapters)
    return make_generator(cfg)


class StageGenerators:
    """The ``Generators`` open in this process, shared by every block that uses it and closed after the last."""

    def __init__(self):
        self.generators: Generators | None = None
        self.blocks = 0
        self.lock = threading.Lock()

    @contextmanager
    def open(self, backends: Iterable[BackendConfig]) -> Iterator[Generators]:
        with self.lock:
            if self.generators is None:
                self.generators = Generators()
            self.generators.declare(backends)
            self.blocks += 1
            generators = self.generators
        try:
            yield generators
        finally:
            with self.lock:
                self.blocks -= 1
                last = self.blocks == 0
                if last:
                    self.generators = None
            if last:
                generators.close()


_stage = StageGenerators()


def open_generators(backends: Iterable[BackendConfig]):
    """A stage's generators (``with open_generators(backends):``): its tasks in this process share them,
    and they are closed when the block ends."""
    return _stage.open(backends)


@contextmanager
def generator_for(cfg: BackendConfig) -> Iterator[Generator]:
    """The loaded backend for ``cfg`` while the block runs, from the stage's open generators."""
    with _stage.open([cfg]) as generators, generators.lease(cfg) as generator:
        yield generator


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
