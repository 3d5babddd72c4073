"""Flow: build (or reuse) the retrieval index. CLI: ``distillery index``.

The artifact id covers the index config and a fingerprint of the corpus bytes, so a changed corpus
file gives a new index and an unchanged one is a cache hit (no re-embedding).
"""

from __future__ import annotations

from prefect import flow

from flows.checks import check_plan
from flows.config import PipelineConfig
from flows.plans import plan_pipeline
from storage.store import ArtifactRef, ArtifactStore, default_root
from tasks.caching import bind
from tasks.index import build_index


@flow(name="index", log_prints=True)
def index_flow(cfg: PipelineConfig = PipelineConfig(), home: str | None = None) -> ArtifactRef:
    """Build the FAISS index artifact of ``cfg.index`` under ``home`` and return its reference."""
    plan = plan_pipeline(ArtifactStore(home or default_root()), cfg, ("index",))
    check_plan(plan, cfg)
    stage = plan["index"]
    return bind(build_index, stage.plan)(stage.plan, cfg.index)
