"""Flows: FTP prefixes and teacher rollouts. CLI: ``distillery prefixes``, ``distillery rollout``.

``rollout_flow`` first makes sure its inputs exist (the index, and the prefixes when
``rollout.use_prefixes``), re-using them from the store when they are already built.
"""

from __future__ import annotations

from prefect import flow

from flows.checks import check_rollout_inputs
from flows.config import PipelineConfig
from flows.index import index_flow
from flows.plans import pinned, plan_prefixes, plan_rollout, rollout_datasets
from storage.store import ArtifactRef, ArtifactStore, default_root
from tasks.caching import bind
from tasks.prefixes import build_prefixes
from tasks.rollout import run_rollouts


@flow(name="prefixes", log_prints=True)
def prefixes_flow(cfg: PipelineConfig = PipelineConfig(), home: str | None = None) -> ArtifactRef:
    """The teacher's CoT solutions over the rollout questions, with their first steps (FTP)."""
    store = ArtifactStore(home or default_root())
    if cfg.prefixes.artifact:
        return pinned(store, cfg.prefixes.artifact, "prefixes")
    check_rollout_inputs(cfg)
    plan = plan_prefixes(store, cfg)
    return bind(build_prefixes, plan)(plan, cfg.prefixes, cfg.teacher, rollout_datasets(cfg))


@flow(name="rollout", log_prints=True)
def rollout_flow(cfg: PipelineConfig = PipelineConfig(), home: str | None = None) -> ArtifactRef:
    """Teacher trajectories (graded) for the rollout questions."""
    store = ArtifactStore(home or default_root())
    if cfg.rollout.artifact:
        return pinned(store, cfg.rollout.artifact, "trajectories")
    check_rollout_inputs(cfg)
    index = index_flow(cfg, home=str(store.root))
    prefixes = prefixes_flow(cfg, home=str(store.root)) if cfg.rollout.use_prefixes else None
    plan = plan_rollout(store, cfg, index, prefixes)
    task = bind(run_rollouts, plan)
    return task(plan, cfg.rollout, cfg.teacher, cfg.sandbox, index, cfg.index, cfg.search, prefixes)
