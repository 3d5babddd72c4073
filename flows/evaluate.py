"""Flow: sharded evaluation of baselines and students, then metrics and a report. CLI: ``distillery evaluate``.

The shards of every (method, dataset) are mapped over Prefect's task runner: threads locally
(``evaluate.runner: threads``), one process per shard with ``cores // max_workers`` CPU threads each
(``processes``), a Dask cluster (``dask``, ``--address tcp://…``), and one process per GPU on a
multi-GPU machine. Methods that need a distilled student train it first when it is missing.
"""

from __future__ import annotations

import os

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from agent_runtime.backends import BackendConfig
from flows.checks import check_adapter, check_plan
from flows.config import PipelineConfig
from flows.index import index_flow
from flows.plans import plan_pipeline
from flows.settings import ConfigError
from flows.train import train_flow
from storage.store import ArtifactRef, ArtifactStore, default_root
from tasks.caching import bind
from tasks.evaluate import evaluate_shard, finish_evaluation
from tasks.resources import open_generators
from tasks.shard_worker import ShardJob, ShardPin


@flow(name="evaluate", log_prints=True)
def evaluate_flow(cfg: PipelineConfig = PipelineConfig(), home: str | None = None,
                  adapters: dict[str, ArtifactRef] | None = None) -> ArtifactRef:
    """Evaluate ``cfg.evaluate.methods`` on ``cfg.evaluate.datasets``; returns the ``evals`` artifact.

    The distilled students are ``adapters`` when given (the re-evaluation passes stored ones), else the
    config's, trained first when missing.
    """
    plan = plan_pipeline(ArtifactStore(home or default_root()), cfg, ("evals",), adapters)
    check_plan(plan, cfg)
    stage = plan["evals"]
    if plan.missing("index"):
        index_flow(cfg, home=str(plan.store.root))
    if any(plan.missing(name) for name in stage.inputs if name != "index"):
        train_flow(cfg, home=str(plan.store.root))
    students = plan.adapters()
    for ref in students.values():
        check_adapter(ref.path / "adapter")
    if not plan.built("evals"):
        jobs = shard_jobs(cfg, stage.ref, plan.ref("index"), students)
        # Shards in this process share the models; they are closed when the shards are done.
        with open_generators(job.backend for job in jobs):
            run_shards.with_options(task_runner=task_runner(cfg))(jobs, shard_pins(cfg, len(jobs), gpu_count()))
    return bind(finish_evaluation, stage.plan)(stage.plan)


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
        raise ConfigError(f"method model {model!r} needs a trained {kind} adapter (enable it in the config)")
    return cfg.student.model_copy(update={"adapter": str(adapters[kind].path / "adapter")}), adapters[kind].id


def task_runner(cfg: PipelineConfig):
    if cfg.evaluate.runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ConfigError("evaluate.runner 'dask' needs the dask extra: "
                              "pip install 'distillery[dask]'") from None
        return DaskTaskRunner(address=cfg.evaluate.address) if cfg.evaluate.address else DaskTaskRunner()
    return ThreadPoolTaskRunner(max_workers=cfg.evaluate.max_workers)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()
