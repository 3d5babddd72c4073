"""Evaluation runner ``processes``: each shard in its own Python process with its own CPU thread count."""

import json
import os

import pytest
from flows_fixtures import write_inputs

from common.errors import DiskFull, UserError
from flows.config import PipelineConfig
from storage.catalog import query
from tasks.evaluate import shard_pins
from tasks.shard_worker import ShardPin


def test_pins_give_each_process_its_share_of_the_cores():
    cfg = PipelineConfig.model_validate({"evaluate": {"runner": "processes", "max_workers": 2}})
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert shard_pins(cfg, 3, gpus=0) == [ShardPin(threads=threads)] * 3
    assert ShardPin(threads=threads).env() == {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    assert [p.gpu for p in shard_pins(cfg, 3, gpus=2)] == [0, 1, 0]
    threaded = PipelineConfig.model_validate({"evaluate": {"runner": "threads"}})
    assert shard_pins(threaded, 2, gpus=0) == [None, None]
    assert shard_pins(threaded, 2, gpus=2) == [ShardPin(gpu=0), ShardPin(gpu=1)]
    assert ShardPin(gpu=1).env() == {"CUDA_VISIBLE_DEVICES": "1"}


def config(tmp_path, script=None) -> PipelineConfig:
    """The resume tests' inputs (12 questions answered 4 by a script) evaluated in 2 shard processes."""
    paths = write_inputs(tmp_path, seconds=0)
    corpus, questions, script = paths["corpus"], paths["questions"], script or paths["script"]
    return PipelineConfig.model_validate({
        "index": {"corpus": {"source": str(corpus)}},
        "sandbox": {"workers": 1},
        "teacher": {"kind": "scripted", "model": "scripted", "script": str(script)},
        "evaluate": {"datasets": [{"name": "sums", "source": str(questions), "kind": "math"}],
                     "methods": [{"name": "agent", "model": "teacher"}], "agent": {"max_steps": 2},
                     "num_shards": 2, "max_workers": 2, "runner": "processes"},
    })


def test_processes_runner_runs_each_shard_in_its_own_process(tmp_path, home, prefect_harness):
    from flows.pipeline import run_stage_flow

    ref = run_stage_flow("evaluate", config(tmp_path), str(home))["evaluate"]
    rows = query(home, "select shard, count(*), count(distinct question_id), sum(correct::int) from predictions "
                       "group by 1 order by 1")[1]
    assert sum(r[1] for r in rows) == 12 and all(r[1] == r[2] == r[3] for r in rows)
    done = sorted((ref.path / "jobs").glob("shard-*.done"))
    assert len(done) == 2  # both shards ran through the subprocess entry point
    reports = [json.loads(p.read_text()) for p in done]
    assert sum(r["rows"] for r in reports) == 12
    assert {r["torch_threads"] for r in reports} == {max(1, (os.cpu_count() or 1) // 2)}


def test_a_shard_that_fails_in_its_process_names_the_shard(tmp_path, home, prefect_harness):
    from flows.pipeline import run_stage_flow

    with pytest.raises(RuntimeError, match=r"evaluation shard \d of agent on sums failed in its process"):
        run_stage_flow("evaluate", config(tmp_path, tmp_path / "missing-script.json"), str(home))
    assert not list(home.glob("evaluate/*/predictions/*.parquet"))
    assert not list(home.glob("evaluate/*/manifest.json"))


def test_a_user_error_in_a_shard_process_comes_back_as_a_user_error(tmp_path, home, prefect_harness):
    from flows.pipeline import run_stage_flow

    short = tmp_path / "short-script.json"
    short.write_text(json.dumps(["Thought: answer.\nCode:\n```py\nfinal_answer('4')\n```<end_code>"]))
    # A UserError: the CLI prints it in one line and tasks.retries.is_transient does not retry it.
    with pytest.raises(UserError, match=r"evaluation shard \d of agent on sums: scripted generator ran out"):
        run_stage_flow("evaluate", config(tmp_path, short), str(home))
    errors = sorted(home.glob("evaluate/*/jobs/shard-*.error"))
    assert errors and "ran out of completions" in errors[0].read_text()
    assert not list(home.glob("evaluate/*/manifest.json"))


def test_a_full_disk_in_a_shard_process_comes_back_as_disk_full_naming_the_file(tmp_path, small_home,
                                                                                 prefect_harness):
    """The home (a 256 KiB tmpfs) holds the index and the job files but not the shards' predictions (answers
    with 40 KB of random thought each): the shard processes' DiskFull reaches the stage as DiskFull, naming the
    file (before, the worker's error file found no room either, and the stage failed with an empty message)."""
    import secrets

    from flows.pipeline import run_stage_flow

    big = tmp_path / "big-script.json"
    big.write_text(json.dumps([f"Thought: {secrets.token_hex(20_000)}\nCode:\n```py\nfinal_answer('4')\n```<end_code>"
                               for _ in range(12)]))
    cfg = config(tmp_path, big)
    with pytest.raises(DiskFull, match=r"^evaluation shard \d of agent on sums: no space left on device writing "
                                       r"\S+/predictions/part-0000\d\.parquet; free space there"):
        run_stage_flow("evaluate", cfg, str(small_home.path))
    assert not list(small_home.path.glob("evaluate/*/manifest.json"))
