"""The one skeleton of every stage task, and the Prefect UI artifacts each stage publishes.

``build_artifact`` is how a stage task writes its artifact: one that exists (its manifest is there) is
returned as it is; otherwise it is opened (the finished parts of an earlier, killed attempt are kept),
the stage writes its files, and the manifest is written last. The artifact store is the one answer to
"already built": Prefect's result cache is not used.

All of it happens under the artifact's lock (``ArtifactStore.lock``), so two runs on one home (two
``distillery run``, a CLI run and a Prefect worker) never build an artifact twice nor write it together:
the second waits (one line: ``waiting for rollout/<id> built by pid N …``), then finds it built and reuses
it. A lock dies with its holder, so a killed run's artifact is taken over by the next run, which keeps
its finished parts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from storage.store import Artifact, ArtifactRef, ArtifactStore, StagePlan

Written = tuple[dict[str, int], dict]
"""What a stage's writer returns: the manifest's row counts and metrics."""


def build_artifact(plan: StagePlan, write: Callable[[Artifact], Written], example_query: str) -> ArtifactRef:
    """Write the planned artifact with ``write`` unless it exists; publish it (see the module docstring)."""
    store, name = ArtifactStore(plan.ref.root), f"{plan.ref.stage}/{plan.ref.id}"
    with store.lock(plan.ref) as waited_for:
        if store.exists(plan.ref):  # checked under the lock: a writer we waited for may have finished it
            if waited_for:
                print(f"{name} was built meanwhile by pid {waited_for['pid']}; reusing it", file=sys.stderr)
        else:
            print(f"building {name} (pid {os.getpid()})", file=sys.stderr)
            artifact = store.open(plan)
            row_counts, metrics = write(artifact)
            artifact.finish(row_counts, metrics)
    publish_artifact(store, plan.ref, example_query)
    return plan.ref


def in_prefect_run() -> bool:
    """True inside a flow or task run; plain calls (tests calling ``task.fn``) have no UI to publish to."""
    if "prefect" not in sys.modules:  # no run in this process (an evaluation shard's): do not import Prefect
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def publish_artifact(store: ArtifactStore, ref: ArtifactRef, example_query: str) -> None:
    """A markdown artifact keyed ``<stage>-latest`` describing ``ref`` (no-op outside a Prefect run)."""
    if not in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact

    manifest = store.manifest(ref)
    lineage = " → ".join(f"`{m['stage']}/{m['id']}`" for m in store.lineage(ref.id))
    counts = ", ".join(f"{k}: {v}" for k, v in manifest.get("row_counts", {}).items()) or "–"
    sql = example_query.format(id=ref.id)
    markdown = (
        f"### {ref.stage} `{ref.id}`\n\n"
        f"- folder: `{ref.path}`\n- rows: {counts}\n- lineage: {lineage}\n- created: {manifest.get('created')}\n\n"
        f"Inspect it:\n\n```bash\ndistillery query \"{sql}\"\n```\n"
    )
    create_markdown_artifact(markdown=markdown, key=f"{ref.stage.replace('_', '-')}-latest",
                             description=f"{ref.stage} artifact")
