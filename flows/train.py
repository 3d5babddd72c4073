"""Flows: filter trajectories into SFT data and train the students. CLI: ``distillery train``.

``train_flow`` first builds the inputs its plan says are missing (rollouts, and the teacher's CoT
solutions for the CoT-distilled baseline when ``cot_student.enabled``), then sft_data → adapter for
each student.
"""

from __future__ import annotations

from prefect import flow

from flows.checks import check_plan
from flows.config import PipelineConfig
from flows.plans import plan_pipeline, train_config
from flows.rollout import prefixes_flow, rollout_flow
from storage.store import ArtifactRef, ArtifactStore, default_root
from tasks.caching import bind
from tasks.train import build_sft_data, train_student


@flow(name="train", log_prints=True)
def train_flow(cfg: PipelineConfig = PipelineConfig(), home: str | None = None, resume: bool = False,
               accelerate_config: str | None = None) -> dict[str, ArtifactRef]:
    """The agent-distilled student's adapter (and the CoT-distilled one when enabled)."""
    plan = plan_pipeline(ArtifactStore(home or default_root()), cfg, ("adapters",))
    check_plan(plan, cfg)
    if plan.missing("prefixes"):
        prefixes_flow(cfg, home=str(plan.store.root))
    if plan.missing("trajectories"):
        rollout_flow(cfg, home=str(plan.store.root))
    adapters = {}
    for kind in plan.adapters():
        data, adapter = plan[f"sft_data/{kind}"], plan[f"adapters/{kind}"]
        bind(build_sft_data, data.plan)(data.plan, cfg.sft, plan.ref(data.inputs[0]), kind)
        adapters[kind] = bind(train_student, adapter.plan)(adapter.plan, train_config(cfg, kind), data.ref, resume,
                                                           accelerate_config)
    return adapters
