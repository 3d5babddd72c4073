"""A user error in a child process (an evaluation shard, a training rank) comes back to the parent as one
line on stderr and is raised there with its own type: a full disk is ``DiskFull`` (retried), a bad input a
``UserError`` (not retried). The line needs no disk, so it gets through when the disk is full."""

import io
import json
import sys

import pytest

from common.errors import DiskFull, ServiceUnavailable, UserError, report_line, reported_error
from services.processes import relay


@pytest.mark.parametrize("error", [DiskFull("no space left on device writing /h/x.parquet; free space"),
                                   ServiceUnavailable("http://127.0.0.1:9/v1 did not answer"),
                                   UserError("questions.jsonl:3: 'answer' is missing")])
def test_a_report_line_carries_the_type_and_message(error):
    line = report_line(error)
    assert line.endswith("\n") and line.count("\n") == 1
    back = reported_error("[rank1]:" + line, "shard 2: ")  # torch.distributed may prefix a rank's lines
    assert type(back) is type(error) and str(back) == f"shard 2: {error}"
    assert reported_error("Traceback (most recent call last):\n") is None
    assert reported_error(line[:-10]) is None  # a cut line is not taken for a report


def test_relay_passes_progress_through_and_holds_the_report():
    report = report_line(DiskFull("no space left on device writing /h/p.parquet"))
    stream = io.BufferedReader(io.BytesIO(f"step 1\rstep 2\rdone\nwarning: x\n{report}tail".encode()))
    out = io.StringIO()
    held = relay(stream, out, hold=lambda line: "distillery-user-error" in line)
    assert out.getvalue() == "step 1\rstep 2\rdone\nwarning: x\ntail"
    assert held == [report]


def test_the_shard_worker_reports_a_full_disk_on_stderr_when_it_cannot_write_its_error_file(tmp_path, monkeypatch,
                                                                                             capsys):
    import tasks.shard_worker as worker

    job = tmp_path / "gone" / "shard-00000.json"  # its folder is missing: no .error file can be written
    monkeypatch.setattr(worker.ShardJob, "model_validate_json", classmethod(lambda cls, text: None))
    monkeypatch.setattr(worker.Path, "read_text", lambda self: "{}")

    def full(job):
        raise DiskFull(f"no space left on device writing {tmp_path}/predictions/part-00000.parquet")

    monkeypatch.setattr(worker, "run_shard", full)
    assert worker.main([str(job)]) == 2
    error = reported_error(capsys.readouterr().err)
    assert isinstance(error, DiskFull) and "part-00000.parquet" in str(error)


def test_a_training_rank_that_reports_a_full_disk_fails_the_launch_with_disk_full(tmp_path, monkeypatch):
    from training import launch

    out_dir = tmp_path / "train"
    out_dir.mkdir()
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"config": {}, "examples_path": str(tmp_path / "x.parquet"), "out_dir": str(out_dir)}))
    config = tmp_path / "accelerate.yaml"
    config.write_text("{}")
    line = report_line(DiskFull(f"no space left on device writing {out_dir}/checkpoints/step-10/adapter.bin"))
    # The launched process as a rank that ran out of space reports it: its line and exit code 2.
    script = f"import sys; sys.stderr.write('loss 0.5\\n' + {line!r}); sys.exit(2)"
    monkeypatch.setattr(launch, "launch_command", lambda job_path, cfg: [sys.executable, "-c", script])
    with pytest.raises(DiskFull, match=r"^training failed: no space left on device writing .*adapter\.bin; no "
                                       r"checkpoint was complete, so a re-run starts from the beginning$"):
        launch.launch_accelerate(job, config)


def test_the_training_entry_reports_a_user_error_and_exits_2(tmp_path, monkeypatch, capsys):
    import training.sft
    from training import launch

    job = tmp_path / "job.json"
    job.write_text(json.dumps({"config": {}, "examples_path": str(tmp_path / "x.parquet"),
                               "out_dir": str(tmp_path / "out")}))
    monkeypatch.setattr(launch, "read_examples", lambda path: [])

    def full(*args, **kwargs):
        raise DiskFull("no space left on device writing /h/train/abc/losses.parquet")

    monkeypatch.setattr(training.sft, "train_lora", full)
    assert launch.main([str(job)]) == 2
    assert isinstance(reported_error(capsys.readouterr().err), DiskFull)
