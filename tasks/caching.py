"""Prefect caching keyed by artifact id.

A stage task receives a ``StagePlan`` whose ``ref.id`` is the content hash of the stage's inputs and
the code version (never the flow-run id), and the cache key is exactly that id. Results persist under
``<artifact root>/prefect-results``, so a new flow run, even against a fresh ephemeral Prefect
database, finds the cached result. The store stays the source of truth: when the artifact folder is
gone, the flow asks Prefect to refresh the cache instead of returning a reference to nothing.
"""

from __future__ import annotations

from pathlib import Path

from prefect import Task

from storage.store import ArtifactStore, StagePlan


def artifact_key(context, parameters: dict) -> str:
    """The cache key of a stage task: ``<stage>-<artifact id>`` of its ``plan`` parameter."""
    plan: StagePlan = parameters["plan"]
    return f"{plan.ref.stage}-{plan.ref.id}"


def result_storage(root: Path | str) -> Path:
    return Path(root).resolve() / "prefect-results"


def bind(task: Task, plan: StagePlan) -> Task:
    """``task`` configured to cache under the plan's store root, refreshing when the artifact is missing."""
    store = ArtifactStore(plan.ref.root)
    return task.with_options(
        result_storage=result_storage(store.root),
        refresh_cache=not store.exists(plan.ref),
    )
