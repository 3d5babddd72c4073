"""Run :func:`training.sft.train_lora` under ``accelerate launch`` in a subprocess.

CUDA cannot be initialised in a forked worker, and DDP/FSDP need one process per device, so the
orchestrator writes a JSON job file and starts::

    python -m accelerate.commands.launch --config_file configs/accelerate/single_device.yaml \\
        -m training.launch job.json

Every launched process runs :func:`main`, which reads the job (training config, examples file, output
folder, resume flag) and calls ``train_lora``; the main process writes ``out_dir/metrics.json``.
The examples file is a Parquet table with a ``messages_json`` column (schema
``storage.schemas.SFT_EXAMPLES``), one chat example per row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from training.sft import TrainConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class TrainJob(BaseModel):
    """What one launched training run needs; serialised as the job file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: TrainConfig = Field(description="the training run's config")
    examples_path: Path = Field(description="Parquet file with a messages_json column (SFT_EXAMPLES)")
    out_dir: Path = Field(description="artifact folder: adapter/, losses.parquet, loss.png, checkpoints/")
    resume: bool = Field(False, description="continue from the newest complete checkpoint in out_dir")


class LaunchError(RuntimeError):
    """``accelerate launch`` exited with an error."""


def write_job(job_path: Path, job: TrainJob) -> Path:
    """Write ``job`` as JSON to ``job_path`` (atomically) and return the path."""
    job_path = Path(job_path)
    temporary = job_path.with_name(f".{job_path.name}.tmp")
    temporary.write_text(job.model_dump_json(indent=2))
    os.replace(temporary, job_path)
    return job_path


def read_examples(path: Path) -> list[list[dict]]:
    """The chat examples of a Parquet file with a ``messages_json`` column, in row order."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["messages_json"])
    examples = []
    for row, text in enumerate(table.column("messages_json").to_pylist()):
        try:
            examples.append(json.loads(text))
        except (TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: row {row}: messages_json is not valid JSON ({error})") from error
    return examples


def main(argv: list[str] | None = None) -> int:
    """Entry point of each launched process: ``python -m training.launch JOB.json``."""
    from training.sft import train_lora

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m training.launch JOB.json", file=sys.stderr)
        return 2
    job = TrainJob.model_validate_json(Path(args[0]).read_text())
    job.out_dir.mkdir(parents=True, exist_ok=True)
    train_lora(job.config, read_examples(job.examples_path), job.out_dir, resume=job.resume)
    return 0


def launch_command(job_path: Path, accelerate_config: Path) -> list[str]:
    """The ``accelerate launch`` command line, with this interpreter."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
        "-m", "training.launch", str(job_path),
    ]


def launch_accelerate(job_path: Path, accelerate_config: Path) -> subprocess.CompletedProcess:
    """Run the job through ``accelerate launch`` and wait; raise LaunchError if it fails.

    Output (progress bar, logs) goes to this process's stdout/stderr. The metrics are in
    ``out_dir/metrics.json`` afterwards.
    """
    if not Path(accelerate_config).is_file():
        raise FileNotFoundError(f"accelerate config {accelerate_config} does not exist (see configs/accelerate/)")
    env = dict(os.environ)
    # The launched processes import training.* by module name: make the project importable.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    command = launch_command(job_path, accelerate_config)
    completed = subprocess.run(command, env=env, check=False)
    if completed.returncode != 0:
        raise LaunchError(f"training failed (exit code {completed.returncode}): {' '.join(command)}")
    return completed


if __name__ == "__main__":
    sys.exit(main())
