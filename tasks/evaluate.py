"""Prefect tasks: one evaluation shard, and the metrics + report of a finished evaluation.

A shard is (method, dataset, shard index); it writes ``predictions/part-<n>.parquet`` atomically and is
skipped when that file exists, so a killed evaluation resumes without redoing finished shards. A shard
runs in the flow's worker, or in its own process (``python -m tasks.evaluate JOB.json``): pinned with
``CUDA_VISIBLE_DEVICES`` on a machine with several GPUs (CUDA cannot start in a forked worker), or with
its own number of CPU threads (runner ``processes``), so that shards side by side do not share, and
fight over, one process's intra-op thread pool.
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
from storage.errors import UserError
from storage.schemas import METRICS, PREDICTIONS
from storage.store import ArtifactError, ArtifactRef, ArtifactStore, StagePlan, atomic_write_table, part_name
from tasks.caching import artifact_key
from tasks.progress import Progress
from tasks.publish import in_prefect_run, publish_artifact
from tasks.resources import SearchConfig, generator_for, search_for
from tasks.retries import is_transient


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
    dataset = with_limit(with_limit(dataset, job.cfg.limit), method.limit)
    questions = split_parts(load_dataset(dataset), job.cfg.num_shards)[job.shard]
    labels = {"artifact_id": job.eval_ref.id, "model": job.backend.model, "method": method.name,
              "adapter": job.adapter_id, "shard": job.shard}
    rows: list[dict] = []
    if questions:
        search = search_for(job.index, job.index_cfg, job.search)
        progress = Progress(len(questions), f"{method.name} on {dataset.name}"
                            + (f" (shard {job.shard + 1}/{job.cfg.num_shards})" if job.cfg.num_shards > 1 else ""))
        with generator_for(job.backend) as generator, Sandbox(job.sandbox, search=search) as sandbox:
            rows = evaluate_questions(questions, dataset.kind, method, job.cfg, generator, sandbox, labels,
                                      on_progress=lambda finished, _total: progress.update(finished))
        progress.close()
    # An empty shard still writes its (empty) file: it is done, and resume must not revisit it.
    atomic_write_table(job.path, pa.Table.from_pylist(rows, schema=PREDICTIONS), PREDICTIONS)
    return len(rows)


class ShardPin(BaseModel):
    """Where a shard runs: in the worker (nothing set), or in a subprocess on one GPU and/or N CPU threads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu: int | None = None
    threads: int | None = None

    def env(self) -> dict[str, str]:
        env = {}
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu)
        if self.threads is not None:
            # torch sizes its intra-op pool from OMP_NUM_THREADS when it is imported.
            env |= {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        return env


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
    done = subprocess.run([sys.executable, "-m", "tasks.evaluate", str(job_path)],
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


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry: ``python -m tasks.evaluate JOB.json`` runs one shard."""
    job_path = Path((argv or sys.argv[1:])[0])
    job_path.with_suffix(".error").unlink(missing_ok=True)
    try:
        rows = run_shard(ShardJob.model_validate_json(job_path.read_text()))
    except UserError as exc:  # the parent raises it again; no traceback for an input error
        job_path.with_suffix(".error").write_text(str(exc))
        return 2
    torch = sys.modules.get("torch")  # imported by the model or the retriever's embedder
    threads = torch.get_num_threads() if torch is not None else None
    job_path.with_suffix(".done").write_text(json.dumps({"rows": rows, "torch_threads": threads}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
