"""Prefect task of the ``rollout`` stage: graded teacher trajectories (``agent_runtime.rollout``)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pyarrow as pa
from prefect import task
from prefect.artifacts import create_table_artifact

from agent_runtime.rollout import RolloutConfig, run_questions, split_parts
from agent_runtime.sandbox import Sandbox
from evaluation.grading import grade
from questions.datasets import load_dataset, with_limit
from storage.catalog import read_table
from storage.schemas import EPISODES, STEPS
from storage.store import Artifact, ArtifactRef, StagePlan, part_name
from tasks.artifacts import Written, build_artifact, in_prefect_run
from tasks.progress import Progress
from tasks.resources import generator_for, search_for
from tasks.retries import TRANSIENT_RETRIES

if TYPE_CHECKING:
    from flows.config import PipelineConfig
    from flows.stages import StageOptions


@task(name="rollout", **TRANSIENT_RETRIES)
def build(plan: StagePlan, cfg: PipelineConfig, inputs: dict[str, ArtifactRef], kind: str,
          options: StageOptions) -> ArtifactRef:
    """Run every unfinished part, then write the manifest; finished parts of an earlier run are kept."""
    def write(artifact):
        work = pending_parts(artifact.path, cfg.rollout)
        if work:
            prefixes = inputs.get("prefixes")
            run_parts(artifact, work, cfg, inputs["index"], read_prefixes(prefixes) if prefixes else {})
        return finish_rollouts(artifact)

    return build_artifact(plan, write, "select dataset, count(*), avg(correct::int) from episodes "
                                       "where artifact_id = '{id}' group by all")


def run_parts(artifact: Artifact, work: list, cfg: PipelineConfig, index: ArtifactRef,
              first_steps: dict[str, str]) -> None:
    """The teacher's episodes of each pending (part, dataset, questions), one part file at a time."""
    rollout, teacher = cfg.rollout, cfg.teacher
    search = search_for(index, cfg.index, cfg.search)
    progress = Progress(sum(len(qs) for _, _, qs in work) * rollout.samples_per_question, "teacher rollouts")
    done = 0
    with generator_for(teacher) as generator, Sandbox(cfg.sandbox, search=search) as sandbox:
        for part, dataset, questions in work:
            rows = run_questions(
                questions, dataset.kind, generator, sandbox, rollout.agent, grade,
                rollout.samples_per_question, first_steps,
                {"artifact_id": artifact.ref.id, "model": teacher.model, "method": "agent"},
                on_progress=lambda finished, _total, base=done: progress.update(base + finished),
            )
            # Steps first: a part counts as done when its episodes file exists.
            artifact.write_table("steps", rows_table(rows.steps, STEPS, artifact.ref.id), STEPS, part=part)
            artifact.write_table("episodes", rows_table(rows.episodes, EPISODES, artifact.ref.id), EPISODES,
                                 part=part)
            done += len(rows.episodes)
    progress.close()


def pending_parts(artifact_dir, cfg: RolloutConfig) -> list[tuple[int, object, list]]:
    """(part number, dataset, questions) of the parts whose episodes file does not exist yet."""
    work = []
    for dataset_index, dataset in enumerate(cfg.datasets):
        questions = load_dataset(with_limit(dataset, cfg.limit))
        for index, part_questions in enumerate(split_parts(questions, cfg.num_parts)):
            part = dataset_index * cfg.num_parts + index
            if part_questions and not (artifact_dir / "episodes" / part_name(part)).is_file():
                work.append((part, dataset, part_questions))
    return work


def rows_table(rows: list[dict], schema: pa.Schema, artifact_id: str) -> pa.Table:
    return pa.Table.from_pylist([{**row, "artifact_id": artifact_id} for row in rows], schema=schema)


def finish_rollouts(artifact: Artifact) -> Written:
    """Row counts, and accuracy and error counts by dataset (also published as a table artifact)."""
    episodes = read_table(artifact.path, "episodes")
    steps = read_table(artifact.path, "steps")
    summary = summarize(episodes, steps)
    if in_prefect_run():
        create_table_artifact(table=summary, key="rollout-accuracy", description="teacher rollouts by dataset")
    return {"episodes": episodes.num_rows, "steps": steps.num_rows}, {"by_dataset": summary}


def summarize(episodes: pa.Table, steps: pa.Table) -> list[dict]:
    """Per dataset: episodes, accuracy, and how many steps had each kind of error."""
    import duckdb

    con = duckdb.connect()
    con.register("episodes", episodes)
    con.register("steps", steps)
    rows = con.execute("""
        select e.dataset, count(*) as episodes, round(avg(e.correct::int), 4) as accuracy,
               sum((e.error is not null)::int) as errored,
               (select count(*) from steps s where s.dataset = e.dataset and s.error_kind = 'parse') as parse_errors,
               (select count(*) from steps s where s.dataset = e.dataset
                  and s.error_kind not in ('none', 'parse')) as execution_errors
        from episodes e group by e.dataset order by e.dataset
    """).fetchall()
    names = ["dataset", "episodes", "accuracy", "errored", "parse_errors", "execution_errors"]
    return json.loads(json.dumps([dict(zip(names, row)) for row in rows], default=float))


def read_prefixes(ref: ArtifactRef) -> dict[str, str]:
    """question id → first-thought prefix, from a prefixes artifact."""
    table = read_table(ref.path, "cot_solutions")
    return {qid: prefix for qid, prefix in zip(table.column("question_id").to_pylist(),
                                               table.column("prefix").to_pylist()) if prefix}
