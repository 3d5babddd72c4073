"""The inputs of each stage, checked before the stage starts.

A malformed dataset, corpus, model file or adapter folder is found here, in a second, instead of after
Prefect has started and a task has loaded a model. Each stage names its check in the registry
(``flows.stages``), and ``flows.plans.check_plan`` runs the checks of what a run's plan still has to build:
the CLI before it starts any flow, and each flow on its own plan first, so a deployment run with bad
parameters fails before its first task too.
Every failure is a ``UserError`` whose message names the file (and line) or the key.

What is read: every question of every dataset; the first ``PREFLIGHT_DOCUMENTS`` documents of the
corpus (a malformed record further into a multi-GB corpus is still found by the index task, which does
not retry it); the header of a local GGUF file; an adapter's config and the weights file's index.
"""

from __future__ import annotations

from pathlib import Path

from agent_runtime.backends import BackendConfig
from evaluation.evaluate import EvalConfig
from models.files import check_adapter, check_gguf
from models.resolve import resolve_embedder, resolve_model
from questions.datasets import DatasetConfig, load_dataset, with_limit
from retrieval.corpus import CorpusConfig, iter_passages
from retrieval.index import IndexConfig

PREFLIGHT_DOCUMENTS = 1000
# Backends whose `model` is a server-side name, not a spec resolved to local files.
REMOTE_KINDS = ("openai", "scripted")


def check_index_inputs(cfg: IndexConfig) -> None:
    resolve_embedder(cfg.embedder)
    check_corpus(cfg.corpus)


def check_base_model(spec: str) -> None:
    """The model a student's adapter is trained on resolves to local files."""
    resolve_model(spec)


def check_evaluate_inputs(cfg: EvalConfig, teacher: BackendConfig, student: BackendConfig) -> None:
    """The models the evaluation methods run (a distilled student is the student plus its adapter)."""
    models = {m.model for m in cfg.methods}
    if "teacher" in models:
        check_backend(teacher)
    if models - {"teacher"}:
        check_backend(student)
    check_datasets(cfg.datasets, cfg.limit)


def check_datasets(datasets: tuple[DatasetConfig, ...], limit: int | None) -> None:
    for dataset in datasets:
        load_dataset(with_limit(dataset, limit))


def check_corpus(cfg: CorpusConfig) -> None:
    """Read the corpus's first documents: a missing file, an unknown format or bad fields fail here."""
    limit = min(cfg.limit or PREFLIGHT_DOCUMENTS, PREFLIGHT_DOCUMENTS)
    for _ in iter_passages(cfg.model_copy(update={"limit": limit})):
        pass


def check_backend(backend: BackendConfig) -> None:
    """A backend that loads local files: its model resolves (and a local GGUF reads), its adapter is whole."""
    if backend.kind in REMOTE_KINDS:
        return
    source = resolve_model(backend.model)
    if source.gguf_file and Path(backend.model).expanduser().is_file():  # a user's file, not a shipped one
        check_gguf(source.path / source.gguf_file)
    if backend.adapter is not None:
        check_adapter(Path(backend.adapter))
