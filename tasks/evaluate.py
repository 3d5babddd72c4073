"""Prefect tasks: one evaluation shard, and the metrics + report of a finished evaluation.

A shard is (method, dataset, shard index); it writes ``predictions/part-<n>.parquet`` atomically and is
skipped when that file exists, so a killed evaluation resumes without redoing finished shards. On a
machine with several GPUs each shard runs in its own process pinned with ``CUDA_VISIBLE_DEVICES``
(``python -m tasks.evaluate JOB.json``), since CUDA cannot start in a forked worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict

from agent_runtime.backends import BackendConfig
from agent_runtime.sandbox import Sandbox, SandboxConfig
from evaluation.datasets import load_dataset
from evaluation.evaluate import EvalConfig, evaluate_questions
from evaluation.rollout import split_parts, with_limit
from retrieval.index import IndexConfig
from storage.catalog import read_table
from storage.schemas import METRICS, PREDICTIONS
from storage.store import ArtifactError, ArtifactRef, ArtifactStore, StagePlan, atomic_write_table, part_name
from tasks.caching import artifact_key
from tasks.publish import in_prefect_run, publish_artifact
from tasks.resources import SearchConfig, generator_for, search_for


class ShardJob(BaseModel):
    """Everything one shard needs, as references and configs (JSON-serialisable for a subprocess)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    eval_ref: ArtifactRef
    cfg: EvalConfig
    method_index: int
    dataset_index: int
    shard: int
    backend: BackendConfig
    adapter_id: str | None
    sandbox: SandboxConfig
    index: ArtifactRef
    index_cfg: IndexConfig
    search: SearchConfig

    @property
    def part(self) -> int:
        """The shard's file number: unique per (method, dataset, shard)."""
        per_method = len(self.cfg.datasets) * self.cfg.num_shards
        return self.method_index * per_method + self.dataset_index * self.cfg.num_shards + self.shard

    @property
    def path(self) -> Path:
        return self.eval_ref.path / "predictions" / part_name(self.part)


def run_shard(job: ShardJob) -> int:
    """Evaluate one shard (unless its file exists); returns the number of prediction rows."""
    if job.path.is_file():
        return -1
    method, dataset = job.cfg.methods[job.method_index], job.cfg.datasets[job.dataset_index]
    questions = split_parts(load_dataset(with_limit(dataset, job.cfg.limit)), job.cfg.num_shards)[job.shard]
    labels = {"artifact_id": job.eval_ref.id, "model": job.backend.model, "method": method.name,
              "adapter": job.adapter_id, "shard": job.shard}
    rows: list[dict] = []
    if questions:
        generator = generator_for(job.backend)
        search = search_for(job.index, job.index_cfg, job.search)
        with Sandbox(job.sandbox, search=search) as sandbox:
            rows = evaluate_questions(questions, dataset.kind, method, job.cfg, generator, sandbox, labels)
    # An empty shard still writes its (empty) file: it is done, and resume must not revisit it.
    atomic_write_table(job.path, pa.Table.from_pylist(rows, schema=PREDICTIONS), PREDICTIONS)
    return len(rows)


@task(name="evaluate-shard", retries=1, retry_delay_seconds=5)
def evaluate_shard(job: ShardJob, gpu: int | None = None) -> int:
    """One shard in this process, or in a subprocess pinned to ``gpu``."""
    if gpu is None:
        return run_shard(job)
    job_path = job.eval_ref.path / "jobs" / f"shard-{job.part:05d}.json"
    job_path.parent.mkdir(parents=True, exist_ok=True)
    job_path.write_text(job.model_dump_json())
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
    subprocess.run([sys.executable, "-m", "tasks.evaluate", str(job_path)], env=env, check=True)
    return json.loads(job_path.with_suffix(".done").read_text())["rows"]


@task(name="evaluation-report", cache_key_fn=artifact_key, persist_result=True)
def finish_evaluation(plan: StagePlan) -> ArtifactRef:
    """Metrics table, markdown report and plots from the shards' predictions; then the manifest."""
    from evaluation.metrics import compute_metrics
    from evaluation.report import table2_markdown, write_report

    store = ArtifactStore(plan.ref.root)
    if not store.exists(plan.ref):
        artifact = store.open(plan)
        predictions = read_table(artifact.path, "predictions")
        check_unique(predictions, artifact.path)
        metrics = compute_metrics(predictions, plan.ref.id)
        artifact.write_table("metrics", metrics, METRICS)
        paths = write_report(artifact.path, metrics, predictions)
        artifact.finish({"predictions": predictions.num_rows, "metrics": metrics.num_rows},
                        {"report": str(paths["report"]), "table": metrics.to_pylist()})
    metrics = read_table(plan.ref.path, "metrics")
    if in_prefect_run():
        create_markdown_artifact(markdown=table2_markdown(metrics), key="evaluation-report",
                                 description=f"evaluation {plan.ref.id}")
        create_table_artifact(table=json.loads(json.dumps(metrics.to_pylist(), default=str)), key="evaluation-metrics")
    publish_artifact(store, plan.ref, "select method, dataset, accuracy from metrics where artifact_id = '{id}'")
    return plan.ref


def check_unique(predictions: pa.Table, where: Path) -> None:
    """Each question is evaluated exactly once per (model, adapter, method, dataset)."""
    keys = list(zip(*(predictions.column(c).to_pylist() for c in ("model", "adapter", "method", "dataset",
                                                                      "question_id", "sample_index"))))
    if len(keys) != len(set(keys)):
        raise ArtifactError(f"{where}: duplicate predictions ({len(keys) - len(set(keys))} rows)")


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry: ``python -m tasks.evaluate JOB.json`` runs one shard."""
    job_path = Path((argv or sys.argv[1:])[0])
    rows = run_shard(ShardJob.model_validate_json(job_path.read_text()))
    job_path.with_suffix(".done").write_text(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
