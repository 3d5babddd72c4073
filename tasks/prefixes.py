"""Prefect task of the ``prefixes`` stage: the teacher's CoT solutions and FTP prefixes
(``agent_runtime.prefixes``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
from prefect import task

from agent_runtime.prefixes import PrefixConfig, solve_with_cot
from evaluation.grading import extract_answer, grade
from questions.datasets import load_dataset
from storage.catalog import read_table
from storage.schemas import COT_SOLUTIONS
from storage.store import ArtifactRef, StagePlan, part_name
from tasks.artifacts import build_artifact
from tasks.progress import Progress
from tasks.resources import generator_for
from tasks.retries import TRANSIENT_RETRIES

if TYPE_CHECKING:
    from flows.config import PipelineConfig
    from flows.stages import StageOptions


@task(name="prefixes", **TRANSIENT_RETRIES)
def build(plan: StagePlan, cfg: PipelineConfig, inputs: dict[str, ArtifactRef], kind: str,
          options: StageOptions) -> ArtifactRef:
    """One ``cot_solutions`` part per rollout dataset; a dataset whose part exists is not redone."""
    def write(artifact):
        loaded = [(index, d, load_dataset(d)) for index, d in enumerate(cfg.rollout_datasets())]
        todo = [(i, d, qs) for i, d, qs in loaded if not (artifact.path / "cot_solutions" / part_name(i)).exists()]
        progress = Progress(sum(len(qs) for _, _, qs in todo), "teacher CoT (FTP prefixes)")
        if todo:
            with generator_for(cfg.teacher) as generator:
                write_solutions(artifact, todo, generator, cfg.prefixes, progress)
        progress.close()
        table = read_table(artifact.path, "cot_solutions")
        correct = sum(table.column("correct").to_pylist())
        return {"cot_solutions": table.num_rows}, {"correct": correct, "accuracy": correct / max(table.num_rows, 1)}

    return build_artifact(plan, write, "select dataset, avg(correct::int), count(*) from cot_solutions "
                                       "where artifact_id = '{id}' group by all")


def write_solutions(artifact, todo: list, generator, cfg: PrefixConfig, progress: Progress) -> None:
    """Solve each (part, dataset, questions) of ``todo`` with CoT and write its ``cot_solutions`` part."""
    done = 0
    for part, dataset, questions in todo:
        rows = solve_with_cot(questions, dataset.kind, generator, cfg, grade, extract_answer,
                              on_progress=lambda n, base=done: progress.update(base + n))
        table = pa.Table.from_pylist([{**r, "artifact_id": artifact.ref.id} for r in rows], schema=COT_SOLUTIONS)
        artifact.write_table("cot_solutions", table, COT_SOLUTIONS, part=part)
        done += len(rows)
