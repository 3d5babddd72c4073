"""Prefect task: build the retrieval index artifact (``retrieval.index.build_index``)."""

from __future__ import annotations

from prefect import task

from retrieval.index import IndexConfig
from retrieval.index import build_index as build_faiss_index
from storage.store import ArtifactRef, ArtifactStore, StagePlan
from tasks.caching import artifact_key
from tasks.publish import publish_artifact
from tasks.retries import is_transient


@task(name="build-index", cache_key_fn=artifact_key, persist_result=True, retries=1,
      retry_delay_seconds=5, retry_condition_fn=is_transient)
def build_index(plan: StagePlan, cfg: IndexConfig) -> ArtifactRef:
    """Embed the corpus and write ``faiss.index`` + ``passages.parquet``; reuse a complete artifact."""
    store = ArtifactStore(plan.ref.root)
    if not store.exists(plan.ref):
        artifact = store.open(plan)
        meta = build_faiss_index(cfg, artifact.path)
        artifact.finish({"passages": meta["count"]}, meta)
    publish_artifact(store, plan.ref, "select count(*) from passages where artifact_id = '{id}'")
    return plan.ref
