"""Job files, the shipped accelerate configs, `accelerate launch` and a real SIGKILL + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from training_fixtures import CONFIGS, make_examples, write_examples

from services.processes import project_env
from storage.schemas import SFT_EXAMPLES, rows_to_table
from training.checkpoints import latest_checkpoint
from training.launch import TrainJob, launch_accelerate, read_examples, write_job
from training.sft import TrainConfig, train_lora


def job_for(tmp_path: Path, base: Path, **overrides) -> TrainJob:
    values = {"base_model": str(base), "per_device_batch_size": 1, "grad_accum": 1, "epochs": 2,
              "max_length": 512, "lora": {"r": 4, "alpha": 8}}
    cfg = TrainConfig(**{**values, **overrides})
    examples = write_examples(tmp_path / "examples.parquet", make_examples(12))
    return TrainJob(config=cfg, examples_path=examples, out_dir=tmp_path / "out")


@pytest.mark.parametrize(("name", "kind"), [("single_device", "NO"), ("multi_gpu_ddp", "MULTI_GPU"), ("fsdp", "FSDP"),
                                          ("cpu_ddp", "MULTI_GPU")])
def test_shipped_accelerate_configs_validate(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.value == kind
    if name == "cpu_ddp":  # several local processes through torch.distributed.run, on the CPU, any free port
        assert (config.num_processes, config.use_cpu, config.main_process_port) == (2, True, 0)
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_use_orig_params"] is True
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_job_file_round_trips_and_examples_are_read_in_order(tmp_path):
    job = job_for(tmp_path, Path("/models/student"), seed=7)
    path = write_job(tmp_path / "job.json", job)
    assert TrainJob.model_validate_json(path.read_text()) == job
    assert read_examples(job.examples_path) == make_examples(12)


def test_bad_examples_file_names_the_row(tmp_path):
    rows = [{"question_id": "q0", "sample_index": 0, "dataset": "d", "kind": "agent", "messages_json": "[{"}]
    pq.write_table(rows_to_table(rows, SFT_EXAMPLES), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet: row 0: messages_json is not valid JSON"):
        read_examples(tmp_path / "bad.parquet")


@pytest.mark.slow
@pytest.mark.shares_cores
def test_accelerate_launch_single_device_trains_on_cpu(tmp_path, tiny_student):
    job = job_for(tmp_path, tiny_student, max_steps=3)
    completed = launch_accelerate(write_job(tmp_path / "job.json", job), CONFIGS / "single_device.yaml")
    assert completed.returncode == 0
    metrics = json.loads((job.out_dir / "metrics.json").read_text())
    assert metrics["steps"] == 3
    assert (job.out_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.shares_cores
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_student):
    job = job_for(tmp_path, tiny_student, max_steps=20, checkpoint_every=2)
    process = subprocess.Popen([sys.executable, "-m", "training.launch", str(write_job(tmp_path / "job.json", job))],
                               env=project_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = job.out_dir / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        newest = latest_checkpoint(checkpoints)
        if newest is not None and int(newest.name.split("-")[1]) >= 4:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    killed_at = int(latest_checkpoint(checkpoints).name.split("-")[1])
    assert 4 <= killed_at < 20
    assert not (job.out_dir / "metrics.json").exists()

    examples = read_examples(job.examples_path)
    resumed = train_lora(job.config, examples, job.out_dir, resume=True)
    straight = train_lora(job.config, examples, tmp_path / "straight")
    assert resumed["steps"] == straight["steps"] == 20
    resumed_losses = [r["loss"] for r in pq.read_table(job.out_dir / "losses.parquet").to_pylist()]
    straight_losses = [r["loss"] for r in pq.read_table(tmp_path / "straight" / "losses.parquet").to_pylist()]
    assert resumed_losses == pytest.approx(straight_losses, abs=1e-6)
