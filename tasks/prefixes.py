"""Prefect task: the teacher's CoT solutions and FTP prefixes (``evaluation.prefixes``)."""

from __future__ import annotations

import pyarrow as pa
from prefect import task

from agent_runtime.backends import BackendConfig
from evaluation.prefixes import PrefixConfig, solve_with_cot
from questions.datasets import DatasetConfig, load_dataset
from storage.catalog import read_table
from storage.schemas import COT_SOLUTIONS
from storage.store import ArtifactRef, ArtifactStore, StagePlan, part_name
from tasks.caching import artifact_key
from tasks.progress import Progress
from tasks.publish import publish_artifact
from tasks.resources import generator_for
from tasks.retries import is_transient


@task(name="cot-prefixes", cache_key_fn=artifact_key, persist_result=True, retries=1,
      retry_delay_seconds=5, retry_condition_fn=is_transient)
def build_prefixes(plan: StagePlan, cfg: PrefixConfig, teacher: BackendConfig,
                   datasets: tuple[DatasetConfig, ...]) -> ArtifactRef:
    """Write one ``cot_solutions`` part per dataset; a dataset whose part exists is not redone."""
    store = ArtifactStore(plan.ref.root)
    if not store.exists(plan.ref):
        artifact = store.open(plan)
        loaded = [(index, d, load_dataset(d)) for index, d in enumerate(datasets)]
        todo = [(i, d, qs) for i, d, qs in loaded if not (artifact.path / "cot_solutions" / part_name(i)).exists()]
        progress = Progress(sum(len(qs) for _, _, qs in todo), "teacher CoT (FTP prefixes)")
        if todo:
            with generator_for(teacher) as generator:
                write_solutions(artifact, todo, generator, cfg, progress)
        progress.close()
        table = read_table(artifact.path, "cot_solutions")
        correct = sum(table.column("correct").to_pylist())
        artifact.finish({"cot_solutions": table.num_rows}, {"correct": correct,
                                                            "accuracy": correct / max(table.num_rows, 1)})
    publish_artifact(store, plan.ref, "select dataset, avg(correct::int), count(*) from cot_solutions "
                                      "where artifact_id = '{id}' group by all")
    return plan.ref


def write_solutions(artifact, todo: list, generator, cfg: PrefixConfig, progress: Progress) -> None:
    """Solve each (part, dataset, questions) of ``todo`` with CoT and write its ``cot_solutions`` part."""
    done = 0
    for part, dataset, questions in todo:
        rows = solve_with_cot(questions, dataset.kind, generator, cfg,
                              on_progress=lambda n, base=done: progress.update(base + n))
        table = pa.Table.from_pylist([{**r, "artifact_id": artifact.ref.id} for r in rows], schema=COT_SOLUTIONS)
        artifact.write_table("cot_solutions", table, COT_SOLUTIONS, part=part)
        done += len(rows)
