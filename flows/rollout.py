"""Flows: FTP prefixes and teacher rollouts. CLI: ``distillery prefixes``, ``distillery rollout``.

``rollout_flow`` first builds the inputs its plan says are missing (the index, and the prefixes when
``rollout.use_prefixes``); a stage pinned to an existing artifact (``rollout.artifact``,
``prefixes.artifact``) is returned as is.
"""

from __future__ import annotations

from prefect import flow

from flows.checks import check_plan
from flows.config import PipelineConfig
from flows.index import index_flow
from flows.plans import plan_pipeline, rollout_datasets
from storage.store import ArtifactRef, ArtifactStore, default_root
from tasks.caching import bind
from tasks.prefixes import build_prefixes
from tasks.rollout import run_rollouts


@flow(name="prefixes", log_prints=True)
def prefixes_flow(cfg: PipelineConfig = PipelineConfig(), home: str | None = None) -> ArtifactRef:
    """The teacher's CoT solutions over the rollout questions, with their first steps (FTP)."""
    plan = plan_pipeline(ArtifactStore(home or default_root()), cfg, ("prefixes",))
    check_plan(plan, cfg)
    stage = plan["prefixes"]
    if stage.pinned:
        return stage.ref
    return bind(build_prefixes, stage.plan)(stage.plan, cfg.prefixes, cfg.teacher, rollout_datasets(cfg))


@flow(name="rollout", log_prints=True)
def rollout_flow(cfg: PipelineConfig = PipelineConfig(), home: str | None = None) -> ArtifactRef:
    """Teacher trajectories (graded) for the rollout questions."""
    plan = plan_pipeline(ArtifactStore(home or default_root()), cfg, ("trajectories",))
    check_plan(plan, cfg)
    stage = plan["trajectories"]
    if stage.pinned:
        return stage.ref
    if plan.missing("index"):
        index_flow(cfg, home=str(plan.store.root))
    if plan.missing("prefixes"):
        prefixes_flow(cfg, home=str(plan.store.root))
    prefixes = plan.ref("prefixes") if "prefixes" in stage.inputs else None
    task = bind(run_rollouts, stage.plan)
    return task(stage.plan, cfg.rollout, cfg.teacher, cfg.sandbox, plan.ref("index"), cfg.index, cfg.search, prefixes)
