"""Flows: filter trajectories into SFT data and train the students. CLI: ``distillery train``.

``train_flow`` builds (or re-uses) everything it needs: index → (prefixes) → rollouts → sft_data →
adapter. With ``cot_student.enabled`` it also trains the CoT-distilled baseline from the teacher's
correct CoT solutions.
"""

from __future__ import annotations

from prefect import flow

from flows.checks import check_train_inputs
from flows.config import PipelineConfig
from flows.plans import plan_sft_data, plan_train
from flows.rollout import prefixes_flow, rollout_flow
from storage.store import ArtifactRef, ArtifactStore, default_root
from tasks.caching import bind
from tasks.train import build_sft_data, train_student


@flow(name="train", log_prints=True)
def train_flow(cfg: PipelineConfig = PipelineConfig(), home: str | None = None, resume: bool = False,
               accelerate_config: str | None = None) -> dict[str, ArtifactRef]:
    """The agent-distilled student's adapter (and the CoT-distilled one when enabled)."""
    check_train_inputs(cfg)
    store = ArtifactStore(home or default_root())
    trajectories = rollout_flow(cfg, home=str(store.root))
    adapters = {"agent": train_on(store, cfg, trajectories, "agent", cfg.train, resume, accelerate_config)}
    if cfg.cot_student.enabled:
        solutions = prefixes_flow(cfg, home=str(store.root))
        adapters["cot"] = train_on(store, cfg, solutions, "cot", cfg.cot_student.train, resume, accelerate_config)
    return adapters


def train_on(store: ArtifactStore, cfg: PipelineConfig, source: ArtifactRef, kind: str, train_cfg,
             resume: bool, accelerate_config: str | None) -> ArtifactRef:
    data_plan = plan_sft_data(store, cfg, source, kind)
    data = bind(build_sft_data, data_plan)(data_plan, cfg.sft, source, kind)
    plan = plan_train(store, train_cfg, data)
    return bind(train_student, plan)(plan, train_cfg, data, resume, accelerate_config)
