"""Artifact identities of every stage: what goes into each id (configs, fingerprints, parents).

Kept in one place so a stage command, the pipeline and a deployment all compute the same ids.
"""

from __future__ import annotations

from evaluation.datasets import dataset_fingerprint
from evaluation.rollout import with_limit
from flows.config import PipelineConfig
from retrieval.corpus import corpus_fingerprint
from storage.store import ArtifactError, ArtifactRef, ArtifactStore, StagePlan


def plan_index(store: ArtifactStore, cfg: PipelineConfig) -> StagePlan:
    identity = {"index": cfg.index.model_dump(mode="json"), "corpus_fingerprint": corpus_fingerprint(cfg.index.corpus)}
    return store.plan_stage("index", identity)


def plan_prefixes(store: ArtifactStore, cfg: PipelineConfig) -> StagePlan:
    datasets = rollout_datasets(cfg)
    identity = {"prefixes": cfg.prefixes.model_dump(mode="json"), "teacher": cfg.teacher.model_dump(mode="json"),
                "datasets": [dataset_fingerprint(d) for d in datasets]}
    return store.plan_stage("prefixes", identity)


def plan_rollout(store: ArtifactStore, cfg: PipelineConfig, index: ArtifactRef,
                 prefixes: ArtifactRef | None) -> StagePlan:
    identity = {
        "rollout": cfg.rollout.model_dump(mode="json"), "teacher": cfg.teacher.model_dump(mode="json"),
        "sandbox": cfg.sandbox.model_dump(mode="json"), "search": cfg.search.model_dump(mode="json"),
        "datasets": [dataset_fingerprint(d) for d in rollout_datasets(cfg)],
    }
    parents = [index.id] + ([prefixes.id] if prefixes is not None else [])
    return store.plan_stage("trajectories", identity, parents)


def pinned(store: ArtifactStore, id_: str, stage: str) -> ArtifactRef:
    """An existing artifact named in the config (``rollout.artifact``, ``prefixes.artifact``), checked."""
    ref = store.resolve(id_)
    if ref.stage != stage:
        raise ArtifactError(f"artifact {id_!r} is a {ref.stage} artifact, not {stage}")
    return ref


def rollout_datasets(cfg: PipelineConfig):
    return tuple(with_limit(d, cfg.rollout.limit) for d in cfg.rollout.datasets)


def plan_sft_data(store: ArtifactStore, cfg: PipelineConfig, source: ArtifactRef, kind: str) -> StagePlan:
    return store.plan_stage("sft_data", {"sft": cfg.sft.model_dump(mode="json"), "kind": kind}, [source.id])


def plan_train(store: ArtifactStore, train_cfg, data: ArtifactRef) -> StagePlan:
    return store.plan_stage("adapters", {"train": train_cfg.model_dump(mode="json")}, [data.id])


def plan_evaluate(store: ArtifactStore, cfg: PipelineConfig, index: ArtifactRef,
                  adapters: dict[str, ArtifactRef]) -> StagePlan:
    identity = {
        "evaluate": cfg.evaluate.model_dump(mode="json"), "student": cfg.student.model_dump(mode="json"),
        "teacher": cfg.teacher.model_dump(mode="json"), "sandbox": cfg.sandbox.model_dump(mode="json"),
        "search": cfg.search.model_dump(mode="json"),
        "datasets": [dataset_fingerprint(with_limit(d, cfg.evaluate.limit)) for d in cfg.evaluate.datasets],
        "adapters": {kind: ref.id for kind, ref in sorted(adapters.items())},
    }
    return store.plan_stage("evals", identity, [index.id, *(ref.id for _, ref in sorted(adapters.items()))])


def cached_pipeline(store: ArtifactStore, cfg: PipelineConfig) -> dict[str, ArtifactRef] | None:
    """The pipeline's results if every stage it would run already exists, else None.

    Computes each stage's id exactly as the flows do (index → prefixes → rollouts → sft_data →
    adapters → evals) without running anything, so a repeated ``distillery run`` can answer from the
    store without starting Prefect.
    """
    index = plan_index(store, cfg).ref
    prefixes = None
    if cfg.prefixes.artifact:
        prefixes = pinned(store, cfg.prefixes.artifact, "prefixes")
    elif cfg.rollout.use_prefixes or cfg.cot_student.enabled:
        prefixes = plan_prefixes(store, cfg).ref
    if cfg.rollout.artifact:
        trajectories = pinned(store, cfg.rollout.artifact, "trajectories")
    else:
        trajectories = plan_rollout(store, cfg, index, prefixes if cfg.rollout.use_prefixes else None).ref
    sources = {"agent": (trajectories, cfg.train)}
    if cfg.cot_student.enabled:
        sources["cot"] = (prefixes, cfg.cot_student.train)
    adapters = {kind: plan_train(store, train_cfg, plan_sft_data(store, cfg, source, kind).ref).ref
                for kind, (source, train_cfg) in sources.items()}
    needed = cfg.evaluate.distilled_models()
    evaluation = plan_evaluate(store, cfg, index, {k: r for k, r in adapters.items() if f"{k}_student" in needed}).ref
    stages = [index, trajectories, *adapters.values(), evaluation] + ([prefixes] if prefixes is not None else [])
    if not all(store.exists(ref) for ref in stages):
        return None
    return {**{f"adapter_{kind}": ref for kind, ref in adapters.items()}, "evaluation": evaluation}
