"""Run :func:`training.sft.train_lora` under ``accelerate launch`` in a subprocess.

CUDA cannot be initialised in a forked worker, and DDP/FSDP need one process per device, so the
orchestrator writes a JSON job file and starts::

    python -m accelerate.commands.launch --config_file configs/accelerate/single_device.yaml \\
        -m training.launch job.json

Every launched process runs :func:`main`, which reads the job (training config, examples file, output
folder, resume flag) and calls ``train_lora``; the main process writes ``out_dir/metrics.json``.
The examples file is a Parquet table with a ``messages_json`` column (schema
``storage.schemas.SFT_EXAMPLES``), one chat example per row.

With several processes (``configs/accelerate/cpu_ddp.yaml``, ``multi_gpu_ddp.yaml``, ``fsdp.yaml``)
``accelerate launch`` runs them under ``torch.distributed.run``, which stops every rank when one dies
and prints a failure report. That report is held back: :func:`launch_accelerate` raises one
:class:`LaunchError` naming the rank, how it died and the checkpoint that ``--resume`` continues from.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import TextIO

from pydantic import BaseModel, ConfigDict, Field

from common.errors import REPORT_MARK, UserError, report_line, reported_error
from common.files import atomic_write_bytes
from services.processes import project_env, relay
from training.sft import TrainConfig


class TrainJob(BaseModel):
    """What one launched training run needs; serialised as the job file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: TrainConfig = Field(description="the training run's config")
    examples_path: Path = Field(description="Parquet file with a messages_json column (SFT_EXAMPLES)")
    out_dir: Path = Field(description="artifact folder: adapter/, losses.parquet, loss.png, checkpoints/")
    resume: bool = Field(False, description="continue from the newest complete checkpoint in out_dir")


class LaunchError(UserError, RuntimeError):
    """``accelerate launch`` exited with an error (a rank died, or training failed); one line for the user."""


def write_job(job_path: Path, job: TrainJob) -> Path:
    """Write ``job`` as JSON to ``job_path`` (atomically) and return the path."""
    job_path = Path(job_path)
    atomic_write_bytes(job_path, job.model_dump_json(indent=2).encode())
    return job_path


def read_examples(path: Path) -> list[list[dict]]:
    """The chat examples of a Parquet file with a ``messages_json`` column, in row order."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["messages_json"], page_checksum_verification=True)
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
    try:
        train_lora(job.config, read_examples(job.examples_path), job.out_dir, resume=job.resume)
    except UserError as error:  # a full disk, a bad example: the launcher raises it again, as its own type
        sys.stderr.write(report_line(error))
        sys.stderr.flush()
        return 2
    return 0


def launch_command(job_path: Path, accelerate_config: Path) -> list[str]:
    """The ``accelerate launch`` command line, with this interpreter."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
        "-m", "training.launch", str(job_path),
    ]


def launch_accelerate(job_path: Path, accelerate_config: Path) -> subprocess.CompletedProcess:
    """Run the job through ``accelerate launch`` and wait; raise LaunchError if it fails.

    Output (progress bar, logs) goes to this process's stdout/stderr, up to torch.distributed's failure
    report, which is written to ``out_dir/launch-error.log`` instead. The metrics are in
    ``out_dir/metrics.json`` afterwards.
    """
    if not Path(accelerate_config).is_file():
        raise FileNotFoundError(f"accelerate config {accelerate_config} does not exist (see configs/accelerate/)")
    command = launch_command(job_path, accelerate_config)
    # The launched processes import training.* by module name: project_env makes the project importable.
    process = subprocess.Popen(command, env=project_env(), stderr=subprocess.PIPE)
    report = relay_until_failure_report(process.stderr, sys.stderr)
    returncode = process.wait()
    if returncode == 0:
        sys.stderr.write(report)  # a report line in a run that succeeded was only a warning
        return subprocess.CompletedProcess(command, returncode)
    out_dir = TrainJob.model_validate_json(Path(job_path).read_text()).out_dir
    reported = [error for error in map(reported_error, report.splitlines()) if error is not None]
    if reported:  # a rank's user error (the first, when several ranks report): its own type and message
        raise type(reported[0])(f"training failed: {reported[0]}; {resume_hint(out_dir)}")
    if report:
        (out_dir / "launch-error.log").write_text(report)
    raise LaunchError(failure_message(report, returncode, out_dir))


# torch.distributed.run's agent logs this when a rank has died and it stops the others; from here on
# its stderr is the failure report (a traceback of the launcher and a table of every rank).
_AGENT_FAILURE = re.compile(r"torch/distributed/elastic/\S+\] (Sending process \d+ closing signal|failed \(exitcode)")
# torch.distributed prints a rank's uncaught exception with this prefix on every line.
_RANK_LINE = re.compile(r"^\[rank(\d+)\]:")


def relay_until_failure_report(stream, out: TextIO) -> str:
    """Copy ``stream`` (the launcher's stderr, bytes) to ``out`` as it arrives and return what was held
    back: the ranks' uncaught exceptions (``[rankN]: ...`` lines; when one rank dies the others fail in
    their next collective, and those tracebacks are consequences), a rank's user-error report
    (``common.errors.report_line``) and torch.distributed's failure report.
    Progress bars (``\\r`` updates) pass through as they come."""
    in_report = False

    def hold(line: str) -> bool:
        nonlocal in_report
        in_report = in_report or bool(_AGENT_FAILURE.search(line))
        return in_report or bool(_RANK_LINE.match(line)) or REPORT_MARK in line

    return "".join(relay(stream, out, hold))


def failure_message(report: str, returncode: int, out_dir: Path) -> str:
    """One line: which rank failed and how, and where a re-run resumes.

    The cause is a rank killed by a signal other than the agent's SIGTERM to the survivors, else the
    report's root cause; a rank that raised is named with the last line of its traceback.
    """
    def ranks(text: str) -> list[tuple[int, int]]:
        found = re.findall(r"\brank\s*:\s*(\d+).*?\bexitcode\s*:\s*(-?\d+)", text, re.DOTALL)
        return [(int(rank), int(code)) for rank, code in found]

    killed = [(rank, code) for rank, code in ranks(report) if code < 0 and -code != signal.SIGTERM]
    root_cause = ranks(report.split("Root Cause", 1)[1]) if "Root Cause" in report else []
    causes = killed or root_cause
    if causes and causes[0][1] < 0:
        rank, number = causes[0][0], -causes[0][1]
        name = signal.Signals(number).name if number in set(signal.Signals) else f"signal {number}"
        what = f"rank {rank} was killed by {name}"
    elif causes:
        rank, code = causes[0]
        lines = [line.split(":", 1)[1].strip() for line in report.splitlines() if line.startswith(f"[rank{rank}]:")]
        raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line)]
        what = f"rank {rank} raised {raised[-1]}" if raised else f"rank {rank} exited with code {code}"
    else:
        what = f"accelerate launch exited with code {returncode} (the error is in the log above)"
    report_note = f"; launcher report: {out_dir / 'launch-error.log'}" if report else ""
    return f"training failed: {what}; {resume_hint(out_dir)}{report_note}"


def resume_hint(out_dir: Path) -> str:
    """Where a re-run of a failed training continues from."""
    from training.checkpoints import latest_checkpoint

    checkpoint = latest_checkpoint(out_dir / "checkpoints")
    if checkpoint is None:
        return "no checkpoint was complete, so a re-run starts from the beginning"
    return f"re-run with --resume to continue from the last complete checkpoint {checkpoint}"


if __name__ == "__main__":
    sys.exit(main())
