"""Prefect task of the ``train`` stage: LoRA-train a student on its examples (``training.sft``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task

from storage.store import ArtifactRef, StagePlan
from tasks.artifacts import build_artifact
from training.sft import TrainConfig

if TYPE_CHECKING:
    from flows.config import PipelineConfig
    from flows.stages import StageOptions


@task(name="train", task_run_name="train-{kind}")
def build(plan: StagePlan, cfg: PipelineConfig, inputs: dict[str, ArtifactRef], kind: str,
          options: StageOptions) -> ArtifactRef:
    """The ``kind`` student's adapter, in this process or through ``accelerate launch`` (``options``)."""
    (data,) = inputs.values()
    return train_adapter(plan, cfg.train_config(kind), data, options.resume, options.accelerate_config)


def train_adapter(plan: StagePlan, cfg: TrainConfig, data: ArtifactRef, resume: bool = False,
                  accelerate_config: str | None = None) -> ArtifactRef:
    """LoRA SFT of ``data``'s examples into the planned ``train`` artifact."""
    def write(artifact):
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
        return {"losses": int(metrics.get("steps", 0))}, metrics

    return build_artifact(plan, write, "select step, loss from losses where artifact_id = '{id}' order by step")
