"""The inputs of each stage, checked before the stage starts.

A malformed dataset, corpus, model file or adapter folder is found here, in a second, instead of after
Prefect has started and a task has loaded a model. What is checked is what the run's plan
(``flows.plans``) still has to build: the CLI runs ``check_command`` before it starts any flow, and each
flow checks its own plan first, so a deployment run with bad parameters fails before its first task too.
Every failure is a ``UserError`` whose message names the file (and line) or the key.

What is read: every question of every dataset; the first ``PREFLIGHT_DOCUMENTS`` documents of the
corpus (a malformed record further into a multi-GB corpus is still found by the index task, which does
not retry it); the header of a local GGUF file; an adapter's config and the weights file's index.
"""

from __future__ import annotations

import json
from pathlib import Path

from agent_runtime.backends import BackendConfig
from flows.config import PipelineConfig
from flows.plans import PIPELINE, PipelinePlan, plan_pipeline, train_config
from models.resolve import ModelNotAvailable, resolve_embedder, resolve_model
from questions.datasets import DatasetConfig, load_dataset, with_limit
from retrieval.corpus import CorpusConfig, iter_passages
from storage.store import ArtifactStore

PREFLIGHT_DOCUMENTS = 1000
GGUF_MAGIC = b"GGUF"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Backends whose `model` is a server-side name, not a spec resolved to local files.
REMOTE_KINDS = ("openai", "scripted")


COMMAND_TARGETS = {"index": ("index",), "prefixes": ("prefixes",), "rollout": ("trajectories",),
                   "train": ("adapters",), "evaluate": ("evals",), "run": PIPELINE}
"""What each stage command builds (``flows.plans`` adds the stages those read)."""


def check_command(cfg: PipelineConfig, command: str, store: ArtifactStore) -> None:
    """Check what ``distillery <command>`` will read: the inputs of every stage its plan has to build
    (``serve``, ``server`` and ``sandbox`` build no stage: their runs are checked by the flows)."""
    if command in COMMAND_TARGETS:
        check_plan(plan_pipeline(store, cfg, COMMAND_TARGETS[command]), cfg)


def check_plan(plan: PipelinePlan, cfg: PipelineConfig) -> None:
    """The inputs of the stages ``plan`` still has to build; a built or pinned stage reads nothing.

    So a pipeline whose rollouts are pinned (``rollout.artifact``) or already built never needs the
    teacher's model, and a built index never re-reads its corpus.
    """
    missing = [name for name in plan.stages if plan.missing(name)]
    if "index" in missing:
        check_index_inputs(cfg)
    if {"prefixes", "trajectories"} & set(missing):  # both run the teacher over the training questions
        check_backend(cfg.teacher)
        check_datasets(cfg.rollout.datasets, cfg.rollout.limit)
    for name in missing:
        stage, _, kind = name.partition("/")
        if stage == "adapters":
            resolve_model(train_config(cfg, kind).base_model)
    if "evals" in missing:
        check_evaluate_inputs(cfg)


def check_index_inputs(cfg: PipelineConfig) -> None:
    resolve_embedder(cfg.index.embedder)
    check_corpus(cfg.index.corpus)


def check_evaluate_inputs(cfg: PipelineConfig) -> None:
    """The models the evaluation methods run (a distilled student is the student plus its adapter)."""
    models = {m.model for m in cfg.evaluate.methods}
    if "teacher" in models:
        check_backend(cfg.teacher)
    if models - {"teacher"}:
        check_backend(cfg.student)
    check_datasets(cfg.evaluate.datasets, cfg.evaluate.limit)


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
