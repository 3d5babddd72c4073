"""The ``evaluate`` stage: sharded evaluation of baselines and students, then metrics and a report.

``build`` maps the shards of every (method, dataset) over Prefect's task runner: threads locally
(``evaluate.runner: threads``), one process per shard with ``cores // max_workers`` CPU threads each
(``processes``), a Dask cluster (``dask``, ``--address tcp://…``), and one process per GPU on a
multi-GPU machine; then ``finish_evaluation`` writes the metrics, the report and the manifest.

``evaluate_shard`` runs a shard (``tasks.shard_worker.ShardJob``) in the flow's worker, or in its own
process (``python -m tasks.shard_worker JOB.json``) when its ``ShardPin`` sets a GPU or a number of CPU
threads; a shard whose predictions file exists is skipped, so a killed evaluation resumes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from agent_runtime.backends import BackendConfig
from common.errors import REPORT_MARK, UserError, reported_error
from models.files import check_adapter
from services.processes import relay
from storage.catalog import read_table
from storage.schemas import METRICS
from storage.store import ArtifactError, ArtifactRef, StagePlan, student_adapters
from tasks.artifacts import build_artifact, in_prefect_run
from tasks.resources import open_generators
from tasks.retries import TRANSIENT_RETRIES
from tasks.shard_worker import ShardJob, ShardPin, run_shard

if TYPE_CHECKING:
    from flows.config import PipelineConfig
    from flows.stages import StageOptions


def build(plan: StagePlan, cfg: PipelineConfig, inputs: dict[str, ArtifactRef], kind: str,
          options: StageOptions) -> ArtifactRef:
    """Run the shards whose predictions are missing, then the report task (which writes the manifest)."""
    students = student_adapters(inputs)
    for ref in students.values():
        check_adapter(ref.path / "adapter")
    jobs = shard_jobs(cfg, plan.ref, inputs["index"], students)
    # Shards in this process share the models; they are closed when the shards are done.
    with open_generators(job.backend for job in jobs):
        run_shards.with_options(task_runner=task_runner(cfg))(jobs, shard_pins(cfg, len(jobs), gpu_count()))
    return finish_evaluation(plan)


@flow(name="evaluate-shards")
def run_shards(jobs: list[ShardJob], pins: list[ShardPin | None]) -> list[int]:
    """Map the shards over this flow's task runner, each with its pin (see :func:`shard_pins`)."""
    return evaluate_shard.map(jobs, pins).result()


def shard_pins(cfg: PipelineConfig, count: int, gpus: int) -> list[ShardPin | None]:
    """With several GPUs shard i runs on GPU i mod count; with runner ``processes`` each shard runs in its
    own process with ``cores // max_workers`` threads; otherwise in the runner's worker. Dask workers are
    never pinned: they run on other machines than the flow, each with the GPU it was started with."""
    threads = None
    if cfg.evaluate.runner == "processes":
        threads = max(1, (os.cpu_count() or 1) // cfg.evaluate.max_workers)
    if gpus > 1 and cfg.evaluate.runner != "dask":
        return [ShardPin(gpu=i % gpus, threads=threads) for i in range(count)]
    return [ShardPin(threads=threads) if threads else None] * count


def shard_jobs(cfg: PipelineConfig, eval_ref: ArtifactRef, index: ArtifactRef,
               adapters: dict[str, ArtifactRef]) -> list[ShardJob]:
    jobs = []
    for m, method in enumerate(cfg.evaluate.methods):
        backend, adapter_id = backend_for(cfg, method.model, adapters)
        for d in range(len(cfg.evaluate.datasets)):
            for shard in range(cfg.evaluate.num_shards):
                jobs.append(ShardJob(eval_ref=eval_ref, cfg=cfg.evaluate, method_index=m, dataset_index=d,
                                     shard=shard, backend=backend, adapter_id=adapter_id, sandbox=cfg.sandbox,
                                     index=index, index_cfg=cfg.index, search=cfg.search))
    return jobs


def backend_for(cfg: PipelineConfig, model: str, adapters: dict[str, ArtifactRef]) -> tuple[BackendConfig, str | None]:
    """The backend of a method's model; distilled students are the student plus their adapter."""
    if model == "teacher":
        return cfg.teacher, None
    if model == "student":
        return cfg.student, None
    kind = model.removesuffix("_student")
    if kind not in adapters:
        raise UserError(f"method model {model!r} needs a trained {kind} adapter (enable it in the config)")
    return cfg.student.model_copy(update={"adapter": str(adapters[kind].path / "adapter")}), adapters[kind].id


def task_runner(cfg: PipelineConfig):
    if cfg.evaluate.runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise UserError("evaluate.runner 'dask' needs the dask extra: "
                              "pip install 'distillery[dask]'") from None
        return DaskTaskRunner(address=cfg.evaluate.address) if cfg.evaluate.address else DaskTaskRunner()
    return ThreadPoolTaskRunner(max_workers=cfg.evaluate.max_workers)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


@task(name="evaluate-shard", **TRANSIENT_RETRIES)
def evaluate_shard(job: ShardJob, pin: ShardPin | None = None) -> int:
    """One shard in this process, or in a subprocess pinned as ``pin`` says."""
    if pin is None or not pin.env():
        return run_shard(job)
    if job.path.is_file():
        return -1
    job_path = job.eval_ref.path / "jobs" / f"shard-{job.part:05d}.json"
    job_path.parent.mkdir(parents=True, exist_ok=True)
    job_path.write_text(job.model_dump_json())
    worker = subprocess.Popen([sys.executable, "-m", "tasks.shard_worker", str(job_path)],
                              env={**os.environ, **pin.env()}, stderr=subprocess.PIPE)
    # Its stderr (progress, logs) passes through; a user error's report line is held back and raised here.
    # Read in a thread, so that a grandchild still holding the pipe cannot keep this task waiting.
    held: list[str] = []
    reader = threading.Thread(target=relay, daemon=True, args=(worker.stderr, sys.stderr),
                              kwargs={"hold": lambda line: REPORT_MARK in line and not held.append(line)})
    reader.start()
    worker.wait()
    reader.join(timeout=10)
    if worker.returncode != 0:
        method, dataset = job.cfg.methods[job.method_index].name, job.cfg.datasets[job.dataset_index].name
        context = f"evaluation shard {job.shard} of {method} on {dataset}: "
        for line in held:  # a user error keeps its type: DiskFull and ServiceUnavailable are retried, others not
            if (error := reported_error(line, context)) is not None:
                raise error
        raise RuntimeError(f"evaluation shard {job.shard} of {method} on {dataset} failed in its process "
                           f"(exit {worker.returncode}; job {job_path}); its error is in the log above")
    return json.loads(job_path.with_suffix(".done").read_text())["rows"]


@task(name="evaluate", **TRANSIENT_RETRIES)
def finish_evaluation(plan: StagePlan) -> ArtifactRef:
    """Metrics table, markdown report and plots from the shards' predictions; then the manifest."""
    from evaluation.grading import GRADER_VERSION
    from evaluation.metrics import compute_metrics
    from evaluation.report import table2_markdown, write_report

    def write(artifact):
        predictions = read_table(artifact.path, "predictions")
        check_unique(predictions, artifact.path)
        metrics = compute_metrics(predictions, plan.ref.id)
        artifact.write_table("metrics", metrics, METRICS)
        paths = write_report(artifact.path, metrics, predictions)
        return ({"predictions": predictions.num_rows, "metrics": metrics.num_rows},
                {"report": str(paths["report"]), "table": metrics.to_pylist(), "grader_version": GRADER_VERSION})

    ref = build_artifact(plan, write, "select method, dataset, accuracy from metrics where artifact_id = '{id}'")
    if in_prefect_run():
        metrics = read_table(plan.ref.path, "metrics")
        create_markdown_artifact(markdown=table2_markdown(metrics), key="evaluation-report",
                                 description=f"evaluation {plan.ref.id}")
        create_table_artifact(table=json.loads(json.dumps(metrics.to_pylist(), default=str)), key="evaluation-metrics")
    return ref


def check_unique(predictions: pa.Table, where: Path) -> None:
    """Each question is evaluated exactly once per (model, adapter, method, dataset)."""
    keys = list(zip(*(predictions.column(c).to_pylist() for c in ("model", "adapter", "method", "dataset",
                                                                      "question_id", "sample_index"))))
    if len(keys) != len(set(keys)):
        raise ArtifactError(f"{where}: duplicate predictions ({len(keys) - len(set(keys))} rows)")
