"""Prefect task: teacher rollouts into a ``trajectories`` artifact (``agent_runtime.rollout``)."""

from __future__ import annotations

import json

import pyarrow as pa
from prefect import task
from prefect.artifacts import create_table_artifact

from agent_runtime.backends import BackendConfig
from agent_runtime.rollout import RolloutConfig, run_questions, split_parts
from agent_runtime.sandbox import Sandbox, SandboxConfig
from evaluation.grading import grade
from questions.datasets import load_dataset, with_limit
from retrieval.index import IndexConfig
from storage.catalog import read_table
from storage.schemas import EPISODES, STEPS
from storage.store import ArtifactRef, ArtifactStore, StagePlan, part_name
from tasks.caching import artifact_key
from tasks.progress import Progress
from tasks.publish import in_prefect_run, publish_artifact
from tasks.resources import SearchConfig, generator_for, search_for
from tasks.retries import is_transient


@task(name="teacher-rollouts", cache_key_fn=artifact_key, persist_result=True, retries=1,
      retry_delay_seconds=5, retry_condition_fn=is_transient)
def run_rollouts(plan: StagePlan, cfg: RolloutConfig, teacher: BackendConfig, sandbox_cfg: SandboxConfig,
                 index: ArtifactRef, index_cfg: IndexConfig, search_cfg: SearchConfig,
                 prefixes: ArtifactRef | None = None) -> ArtifactRef:
    """Run every unfinished part, then write the manifest; finished parts of an earlier run are kept."""
    store = ArtifactStore(plan.ref.root)
    if not store.exists(plan.ref):
        artifact = store.open(plan)
        work = pending_parts(artifact.path, cfg)
        if work:
            search = search_for(index, index_cfg, search_cfg)
            first_steps = read_prefixes(prefixes) if prefixes is not None else {}
            progress = Progress(sum(len(qs) for _, _, qs in work) * cfg.samples_per_question, "teacher rollouts")
            done = 0
            with generator_for(teacher) as generator, Sandbox(sandbox_cfg, search=search) as sandbox:
                for part, dataset, questions in work:
                    rows = run_questions(
                        questions, dataset.kind, generator, sandbox, cfg.agent, grade,
                        cfg.samples_per_question, first_steps,
                        {"artifact_id": plan.ref.id, "model": teacher.model, "method": "agent"},
                        on_progress=lambda finished, _total, base=done: progress.update(base + finished),
                    )
                    # Steps first: a part counts as done when its episodes file exists.
                    artifact.write_table("steps", rows_table(rows.steps, STEPS, plan.ref.id), STEPS, part=part)
                    artifact.write_table("episodes", rows_table(rows.episodes, EPISODES, plan.ref.id), EPISODES,
                                         part=part)
                    done += len(rows.episodes)
            progress.close()
        finish_rollouts(store, artifact)
    publish_artifact(store, plan.ref, "select dataset, count(*), avg(correct::int) from episodes "
                                      "where artifact_id = '{id}' group by all")
    return plan.ref


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


def finish_rollouts(store: ArtifactStore, artifact) -> None:
    """Count rows, compute accuracy and error counts, write the manifest, publish a table artifact."""
    episodes = read_table(artifact.path, "episodes")
    steps = read_table(artifact.path, "steps")
    summary = summarize(episodes, steps)
    artifact.finish({"episodes": episodes.num_rows, "steps": steps.num_rows}, {"by_dataset": summary})
    if in_prefect_run():
        create_table_artifact(table=summary, key="rollout-accuracy", description="teacher rollouts by dataset")


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
