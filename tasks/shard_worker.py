"""One evaluation shard: the job (``ShardJob``), where it runs (``ShardPin``), and the worker that runs it.

A shard is (method, dataset, shard index); it writes ``predictions/part-<n>.parquet`` atomically and is
skipped when that file exists, so a killed evaluation resumes without redoing finished shards. The
Prefect task ``tasks.evaluate.evaluate_shard`` runs a shard in the flow's worker (``run_shard``) or in
its own process, ``python -m tasks.shard_worker JOB.json``: pinned with ``CUDA_VISIBLE_DEVICES`` on a
machine with several GPUs (CUDA cannot start in a forked worker), or with its own number of CPU threads
(runner ``processes``), so that shards side by side do not share, and fight over, one process's intra-op
thread pool. This module defines no Prefect task: a shard's process has no flow run to report to.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from agent_runtime.backends import BackendConfig
from agent_runtime.rollout import split_parts
from agent_runtime.sandbox import Sandbox, SandboxConfig
from common.errors import UserError, report_line
from evaluation.evaluate import EvalConfig, evaluate_questions
from questions.datasets import load_dataset, with_limit
from retrieval.index import IndexConfig
from storage.schemas import PREDICTIONS
from storage.store import ArtifactRef, atomic_write_table, part_name
from tasks.progress import Progress
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


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry: ``python -m tasks.shard_worker JOB.json`` runs one shard.

    Writes ``JOB.done`` (rows, torch threads) on success. A user error is reported on stderr
    (``common.errors.report_line``: no disk needed, so a full disk comes back as ``DiskFull``) and kept in
    ``JOB.error`` where there is room; exit code 2.
    """
    job_path = Path((argv or sys.argv[1:])[0])
    job_path.with_suffix(".error").unlink(missing_ok=True)
    try:
        rows = run_shard(ShardJob.model_validate_json(job_path.read_text()))
    except UserError as exc:  # the parent raises it again; no traceback for an input error
        sys.stderr.write(report_line(exc))
        sys.stderr.flush()
        with contextlib.suppress(OSError):
            job_path.with_suffix(".error").write_text(str(exc))
        return 2
    torch = sys.modules.get("torch")  # imported by the model or the retriever's embedder
    threads = torch.get_num_threads() if torch is not None else None
    job_path.with_suffix(".done").write_text(json.dumps({"rows": rows, "torch_threads": threads}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
