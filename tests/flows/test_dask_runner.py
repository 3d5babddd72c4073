"""Evaluation runner ``dask`` on a real cluster: a ``distributed.LocalCluster`` with 2 worker processes on
loopback, driven by ``distillery evaluate --runner dask --address tcp://127.0.0.1:PORT``. Its predictions
equal the ``threads`` runner's on the same shards, and a worker SIGKILLed mid-run leaves nothing done twice:
the run (or its re-run) finishes with every question predicted exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flows_fixtures import write_inputs

from storage.catalog import query

pytest.importorskip("prefect_dask", reason="the dask extra is not installed: pip install -e '.[dask]'")

ROOT = Path(__file__).resolve().parents[2]
# Columns that do not depend on where or when a shard ran (not artifact_id, latency_s, steps_json timings).
COMPARED = "shard, question_id, sample_index, model, method, prediction, correct, score, num_steps, " \
           "prompt_tokens, completion_tokens, error, messages_json"


def write_config(tmp_path: Path, runner: str, seconds: float) -> Path:
    """12 questions in 6 shards, answered by a scripted student after ``seconds`` of sleep per question."""
    paths = write_inputs(tmp_path, seconds=seconds)
    config = tmp_path / f"{runner}.yaml"
    config.write_text(f"""
index: {{corpus: {{source: "{paths['corpus']}"}}}}
sandbox: {{workers: 1}}
student: {{kind: scripted, model: scripted, script: "{paths['script']}"}}
train: {{base_model: scripted}}
evaluate:
  datasets: [{{name: sums, source: "{paths['questions']}", kind: math}}]
  methods: [{{name: agent, model: student, mode: agent}}]
  num_shards: 6
  max_workers: 2
  runner: {runner}
  agent: {{max_steps: 2}}
""")
    return config


@pytest.fixture(scope="module")
def api_url():
    """One Prefect API for the test, the ``distillery`` processes and the Dask workers (each would
    otherwise start a temporary server of its own, ~20 s apiece on 2 cores)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield PREFECT_API_URL.value()


@pytest.fixture
def cluster(api_url):
    from distributed import Client, LocalCluster

    env = {"PREFECT_API_URL": api_url, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", scheduler_port=0,
                      dashboard_address=None, env=env) as local, Client(local) as client:
        yield local, client


def evaluate(home: Path, config: Path, api_url: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": api_url, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "--home", str(home), "evaluate", "--config",
                             str(config), *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def predictions(home: Path) -> list[tuple]:
    return query(home, f"select {COMPARED} from predictions order by shard, question_id")[1]


def threads_predictions(tmp_path: Path, api_url: str, seconds: float) -> list[tuple]:
    """The ``threads`` runner's predictions for the same inputs (its own folder and artifact home)."""
    folder = tmp_path / "threads"
    folder.mkdir()
    home = folder / "home"
    process = evaluate(home, write_config(folder, "threads", seconds), api_url)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return predictions(home)


def worker_pids(client) -> dict[str, int]:
    return client.run(os.getpid)


def test_dask_workers_keep_the_gpus_they_were_started_with():
    from flows.config import PipelineConfig
    from tasks.evaluate import shard_pins

    cfg = PipelineConfig.model_validate({"evaluate": {"runner": "dask", "address": "tcp://127.0.0.1:8786"}})
    # The flow's machine may have 8 GPUs; a worker elsewhere must not be told to use "GPU 5".
    assert shard_pins(cfg, 3, gpus=8) == [None, None, None]


@pytest.mark.slow
@pytest.mark.shares_cores
def test_dask_runner_predicts_what_the_threads_runner_predicts(tmp_path, cluster, api_url):
    local, client = cluster
    expected = threads_predictions(tmp_path, api_url, seconds=0)
    assert len(expected) == 12 and {row[0] for row in expected} == set(range(6))

    home = tmp_path / "dask-home"
    config = write_config(tmp_path, "threads", seconds=0)
    started = time.monotonic()
    process = evaluate(home, config, api_url, "--runner", "dask", "--address", local.scheduler_address)
    output, _ = process.communicate(timeout=600)
    print(f"\ndask runner: {time.monotonic() - started:.1f} s")
    assert process.returncode == 0, output
    assert predictions(home) == expected
    [manifest] = [json.loads(p.read_text()) for p in home.glob("evaluate/*/manifest.json")]
    assert manifest["config"]["evaluate"]["runner"] == "dask"
    # Both worker processes evaluated shards (each writes its shards' files from its own process).
    assert len(worker_pids(client)) == 2


@pytest.mark.slow
@pytest.mark.shares_cores
def test_a_worker_killed_mid_run_leaves_every_question_predicted_once(tmp_path, cluster, api_url):
    local, client = cluster
    expected = threads_predictions(tmp_path, api_url, seconds=1.5)

    home = tmp_path / "dask-home"
    config = write_config(tmp_path, "threads", seconds=1.5)
    address = ("--runner", "dask", "--address", local.scheduler_address)
    pattern = "evaluate/*/predictions/part-*.parquet"
    process = evaluate(home, config, api_url, *address)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None and not list(home.glob(pattern)):
        time.sleep(0.1)
    finished = {p.name: p.stat().st_mtime_ns for p in home.glob(pattern)}
    assert 0 < len(finished) < 6, "the first shard file should appear while other shards still run"
    # Kill a worker that is busy with a shard now: its shard's file is never written.
    busy = [address for address, keys in client.processing().items() if keys]
    victim = worker_pids(client)[busy[0]]
    os.kill(victim, signal.SIGKILL)
    output, _ = process.communicate(timeout=600)
    # Dask gives the lost shard to the other worker, so this run usually finishes by itself (exit 0) and the
    # re-run finds the evaluation done; when it does not, the re-run does the shards without a file.
    first_exit = process.returncode
    print(f"\nfirst run after the kill: exit {first_exit}")

    rerun = evaluate(home, config, api_url, *address)
    rerun_output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, f"first run (exit {first_exit}):\n{output}\nre-run:\n{rerun_output}"
    # One evaluation: the re-run planned the same artifact (its id covers the config and the code version).
    assert len(list(home.glob("evaluate/*/manifest.json"))) == 1
    after = {p.name: p.stat().st_mtime_ns for p in home.glob(pattern)}
    assert len(after) == 6
    assert all(after[name] == mtime for name, mtime in finished.items())  # finished shards were not redone
    assert query(home, "select count(*), count(distinct question_id) from predictions")[1] == [(12, 12)]
    assert predictions(home) == expected
    assert victim not in worker_pids(client).values()  # the nanny replaced the killed worker process
