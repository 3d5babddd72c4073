"""The whole pipeline as one parent flow. CLI: ``distillery run`` (and ``make demo``).

index → FTP prefixes (optional) → teacher rollouts → filter + train the agent-distilled student (and
the CoT-distilled one when enabled) → evaluate baselines and students → report. Each stage flow runs
once, in this order, so each finds its inputs built; every stage is cached by artifact id (see
``flows.plans``), so a re-run with the same config re-uses everything and a change to evaluation
settings re-runs only the evaluation.
"""

from __future__ import annotations

from prefect import flow

from flows.config import PipelineConfig
from flows.evaluate import evaluate_flow
from flows.index import index_flow
from flows.plans import pipeline_results, plan_pipeline
from flows.rollout import prefixes_flow, rollout_flow
from flows.train import train_flow
from storage.store import ArtifactRef, ArtifactStore, default_root


@flow(name="pipeline", log_prints=True)
def pipeline_flow(cfg: PipelineConfig = PipelineConfig(), home: str | None = None) -> dict[str, ArtifactRef]:
    """Run (or re-use) every stage; returns the students' adapters and the evaluation."""
    plan = plan_pipeline(ArtifactStore(home or default_root()), cfg)
    home = str(plan.store.root)
    index_flow(cfg, home=home)
    if "prefixes" in plan:  # the FTP prefixes, or the CoT student's training data
        prefixes_flow(cfg, home=home)
    rollout_flow(cfg, home=home)
    adapters = train_flow(cfg, home=home)
    evaluation = evaluate_flow(cfg, home=home)
    return pipeline_results(adapters, evaluation)
