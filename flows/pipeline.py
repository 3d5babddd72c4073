"""The whole pipeline as one parent flow. CLI: ``distillery run`` (and ``make demo``).

index → FTP prefixes (optional) → teacher rollouts → filter → train the agent-distilled student (and
the CoT-distilled one when enabled) → evaluate baselines and students → report. Every stage is cached
by artifact id, so a re-run with the same config re-uses everything and a change to evaluation
settings re-runs only the evaluation.
"""

from __future__ import annotations

from prefect import flow

from flows.config import PipelineConfig
from flows.evaluate import evaluate_flow
from flows.train import train_flow
from storage.store import ArtifactRef, ArtifactStore, default_root


@flow(name="pipeline", log_prints=True)
def pipeline_flow(cfg: PipelineConfig = PipelineConfig(), home: str | None = None) -> dict[str, ArtifactRef]:
    """Run (or re-use) every stage; returns the final artifacts by name."""
    store = ArtifactStore(home or default_root())
    adapters = train_flow(cfg, home=str(store.root))
    evaluation = evaluate_flow(cfg, home=str(store.root), adapters=adapters)
    return {**{f"adapter_{kind}": ref for kind, ref in adapters.items()}, "evaluation": evaluation}
