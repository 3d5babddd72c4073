"""Prefect task of the ``index`` stage: embed the corpus into a FAISS index (``retrieval.index``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import task

from retrieval.index import build_index
from storage.store import ArtifactRef, StagePlan
from tasks.artifacts import build_artifact
from tasks.retries import TRANSIENT_RETRIES

if TYPE_CHECKING:
    from flows.config import PipelineConfig
    from flows.stages import StageOptions


@task(name="index", **TRANSIENT_RETRIES)
def build(plan: StagePlan, cfg: PipelineConfig, inputs: dict[str, ArtifactRef], kind: str,
          options: StageOptions) -> ArtifactRef:
    """Write ``faiss.index`` + ``passages.parquet`` of ``cfg.index``."""
    def write(artifact):
        meta = build_index(cfg.index, artifact.path)
        return {"passages": meta["count"]}, meta

    return build_artifact(plan, write, "select count(*) from passages where artifact_id = '{id}'")
