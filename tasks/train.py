"""Prefect tasks: filter trajectories into SFT data, and LoRA-train a student (``training``)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
from prefect import task

from storage.catalog import read_table
from storage.errors import UserError
from storage.schemas import SFT_EXAMPLES
from storage.store import ArtifactRef, ArtifactStore, StagePlan
from tasks.caching import artifact_key
from tasks.publish import publish_artifact
from training.data import SftDataConfig, agent_examples, cot_examples
from training.sft import TrainConfig


@task(name="sft-data", cache_key_fn=artifact_key, persist_result=True)
def build_sft_data(plan: StagePlan, cfg: SftDataConfig, source: ArtifactRef, kind: str) -> ArtifactRef:
    """Agent examples from a trajectories artifact, or CoT examples from a prefixes artifact."""
    store = ArtifactStore(plan.ref.root)
    if not store.exists(plan.ref):
        if kind == "agent":
            rows, counts = agent_examples(read_table(source.path, "episodes"), read_table(source.path, "steps"), cfg)
        else:
            rows, counts = cot_examples(read_table(source.path, "cot_solutions"))
        if not rows:
            raise UserError(f"no training examples: {source.stage} artifact {source.id} has no episode that passes "
                            f"the filter ({counts}); run more questions or samples, or use a stronger teacher")
        artifact = store.open(plan)
        artifact.write_table("sft_examples", pa.Table.from_pylist(rows, schema=SFT_EXAMPLES), SFT_EXAMPLES)
        artifact.finish({"sft_examples": len(rows)}, {"filter": counts, "kind": kind})
    publish_artifact(store, plan.ref, "select kind, dataset, count(*) from sft_examples "
                                      "where artifact_id = '{id}' group by all")
    return plan.ref


@task(name="train-student", cache_key_fn=artifact_key, persist_result=True)
def train_student(plan: StagePlan, cfg: TrainConfig, data: ArtifactRef, resume: bool = False,
                  accelerate_config: str | None = None) -> ArtifactRef:
    """LoRA SFT into an ``adapters`` artifact, in this process or through ``accelerate launch``."""
    store = ArtifactStore(plan.ref.root)
    if not store.exists(plan.ref):
        artifact = store.open(plan)
        examples_path = data.path / "sft_examples.parquet"
        if accelerate_config:
            from training.launch import TrainJob, launch_accelerate, write_job

            job = TrainJob(config=cfg, examples_path=examples_path, out_dir=artifact.path, resume=resume)
            launch_accelerate(write_job(artifact.path / "job.json", job), Path(accelerate_config))
            metrics = json.loads((artifact.path / "metrics.json").read_text())
        else:
            from training.launch import read_examples
            from training.sft import train_lora

            metrics = train_lora(cfg, read_examples(examples_path), artifact.path, resume=resume)
        metrics = {**metrics, "base_model": cfg.base_model, "data_artifact": data.id}
        artifact.finish({"losses": int(metrics.get("steps", 0))}, metrics)
    publish_artifact(store, plan.ref, "select step, loss from losses where artifact_id = '{id}' order by step")
    return plan.ref
