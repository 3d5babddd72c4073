"""Prefect tasks: one evaluation shard, and the metrics + report of a finished evaluation.

``evaluate_shard`` runs a shard (``tasks.shard_worker.ShardJob``) in the flow's worker, or in its own
process (``python -m tasks.shard_worker JOB.json``) when its ``ShardPin`` sets a GPU or a number of CPU
threads; a shard whose predictions file exists is skipped, so a killed evaluation resumes.
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

from storage.catalog import read_table
from storage.errors import UserError
from storage.schemas import METRICS
from storage.store import ArtifactError, ArtifactRef, ArtifactStore, StagePlan
from tasks.caching import artifact_key
from tasks.publish import in_prefect_run, publish_artifact
from tasks.retries import is_transient
from tasks.shard_worker import ShardJob, ShardPin, run_shard


@task(name="evaluate-shard", retries=1, retry_delay_seconds=5, retry_condition_fn=is_transient)
def evaluate_shard(job: ShardJob, pin: ShardPin | None = None) -> int:
    """One shard in this process, or in a subprocess pinned as ``pin`` says."""
    if pin is None or not pin.env():
        return run_shard(job)
    if job.path.is_file():
        return -1
    job_path = job.eval_ref.path / "jobs" / f"shard-{job.part:05d}.json"
    job_path.parent.mkdir(parents=True, exist_ok=True)
    job_path.write_text(job.model_dump_json())
    done = subprocess.run([sys.executable, "-m", "tasks.shard_worker", str(job_path)],
                          env={**os.environ, **pin.env()}, check=False)
    if done.returncode != 0:
        method, dataset = job.cfg.methods[job.method_index].name, job.cfg.datasets[job.dataset_index].name
        if job_path.with_suffix(".error").is_file():  # a user error: one line, and not retried
            raise UserError(f"evaluation shard {job.shard} of {method} on {dataset}: "
                            f"{job_path.with_suffix('.error').read_text()}")
        raise RuntimeError(f"evaluation shard {job.shard} of {method} on {dataset} failed in its process "
                           f"(exit {done.returncode}; job {job_path}); its error is in the log above")
    return json.loads(job_path.with_suffix(".done").read_text())["rows"]


@task(name="evaluation-report", cache_key_fn=artifact_key, persist_result=True)
def finish_evaluation(plan: StagePlan) -> ArtifactRef:
    """Metrics table, markdown report and plots from the shards' predictions; then the manifest."""
    from evaluation.grading import GRADER_VERSION
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
                        {"report": str(paths["report"]), "table": metrics.to_pylist(),
                         "grader_version": GRADER_VERSION})
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
