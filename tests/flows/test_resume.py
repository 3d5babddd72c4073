"""Rollouts and evaluation survive SIGKILL: a re-run finishes without redoing the finished parts/shards
(their files keep their modification times) and without doing any question twice. A stage stops within
seconds on SIGTERM, and neither SIGTERM nor SIGKILL leaves a process of it behind (Prefect's temporary
API server, sandbox workers)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flows_fixtures import SLEEP_ACTION, write_inputs, write_rollout_config

from agent_runtime.rollout import split_parts
from common.scratch import SCRATCH_VARIABLE
from questions.datasets import DatasetConfig, load_dataset
from storage.catalog import query


def start(home, command: str, config):
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "--home", str(home), command, "--config",
                             str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_after_first_file(home, command: str, config, pattern: str) -> dict[str, int]:
    """Start ``command``, SIGKILL its process group once a file matching ``pattern`` exists, and return the
    finished files with their mtimes. The stage must not have finished (no manifest)."""
    process = start(home, command, config)
    deadline = time.time() + 900
    while time.time() < deadline and process.poll() is None and not list(home.glob(pattern)):
        time.sleep(0.2)
    assert list(home.glob(pattern)), f"nothing written before the deadline:\n{process.stdout.read()}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    stage = pattern.split("/")[0]
    assert not list(home.glob(f"{stage}/*/manifest.json"))  # killed before finishing
    return {p.name: p.stat().st_mtime_ns for p in home.glob(pattern)}


def rerun_and_check_untouched(home, command: str, config, pattern: str, before: dict[str, int]) -> dict[str, int]:
    again = start(home, command, config)
    output, _ = again.communicate(timeout=900)
    assert again.returncode == 0, output
    after = {p.name: p.stat().st_mtime_ns for p in home.glob(pattern)}
    for name, mtime in before.items():  # finished files were not redone
        assert after[name] == mtime
    return after


@pytest.fixture
def rollout_config(tmp_path):
    return write_rollout_config(tmp_path, seconds=1.5, num_parts=6)


@pytest.fixture
def evaluate_config(tmp_path):
    paths = write_inputs(tmp_path, seconds=1.0)
    config = tmp_path / "evaluate.yaml"
    config.write_text(f"""
index: {{corpus: {{source: "{paths['corpus']}"}}}}
sandbox: {{workers: 1}}
student: {{kind: scripted, model: scripted, script: "{paths['script']}"}}
train: {{base_model: scripted}}
evaluate:
  datasets: [{{name: sums, source: "{paths['questions']}", kind: math}}]
  methods: [{{name: agent, model: student, mode: agent}}]
  num_shards: 6
  max_workers: 1
  agent: {{max_steps: 2}}
""")
    return config


def test_sigkill_mid_rollout_then_rerun_gives_every_question_once(rollout_config, home):
    pattern = "rollout/*/episodes/part-*.parquet"
    before = kill_after_first_file(home, "rollout", rollout_config, pattern)
    rerun_and_check_untouched(home, "rollout", rollout_config, pattern, before)
    rows = query(home, "select count(*), count(distinct question_id), sum(correct::int) from episodes")[1]
    assert rows == [(12, 12, 12)]
    assert query(home, "select count(*) from steps")[1] == [(12,)]


def test_sigkill_mid_evaluation_then_rerun_predicts_every_question_once(evaluate_config, home):
    pattern = "evaluate/*/predictions/part-*.parquet"
    before = kill_after_first_file(home, "evaluate", evaluate_config, pattern)
    assert 0 < len(before) < 6
    after = rerun_and_check_untouched(home, "evaluate", evaluate_config, pattern, before)
    assert len(after) == 6
    rows = query(home, "select count(*), count(distinct question_id), sum(correct::int) from predictions")[1]
    assert rows == [(12, 12, 12)]
    assert query(home, "select method, dataset, n, accuracy from metrics")[1] == [("agent", "sums", 12, 1.0)]


# ----------------------------------------------------------------------------- stopping

@pytest.fixture
def slow_evaluate_config(tmp_path):
    """The evaluation above, but only the first shard is quick: every later action sleeps 60 s."""
    paths = write_inputs(tmp_path, seconds=60)
    quick = SLEEP_ACTION.format(seconds=0.1)
    # One quick action for each question of shard 0 (it runs first: max_workers 1), answered in one step.
    first_shard = len(split_parts(load_dataset(DatasetConfig(name="sums", source=paths["questions"])), 6)[0])
    Path(paths["script"]).write_text(json.dumps([quick] * first_shard + [SLEEP_ACTION.format(seconds=60)] * 20))
    config = tmp_path / "slow.yaml"
    config.write_text(f"""
index: {{corpus: {{source: "{paths['corpus']}"}}}}
sandbox: {{workers: 1, wall_time_s: 300}}
student: {{kind: scripted, model: scripted, script: "{paths['script']}"}}
train: {{base_model: scripted}}
evaluate:
  datasets: [{{name: sums, source: "{paths['questions']}", kind: math}}]
  methods: [{{name: agent, model: student, mode: agent}}]
  num_shards: 6
  max_workers: 1
  agent: {{max_steps: 2}}
""")
    return config


def start_alone(home, tmp_path, config):
    """``distillery evaluate`` as its own process (not a group leader we could kill wholesale), with its
    temporary files (the sandbox's directory) under ``tmp_path/tmp`` so its processes can be found."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    command = [sys.executable, "-m", "flows.cli", "--home", str(home), "evaluate", "--config", str(config)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for(pattern_root, pattern: str, process, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and process.poll() is None and not list(pattern_root.glob(pattern)):
        time.sleep(0.2)
    assert list(pattern_root.glob(pattern)), f"nothing written before the deadline:\n{process.stdout.read()}"


def leftover_processes(tmp_path) -> list[str]:
    """Live processes started for the test: the home (or the sandbox directory) is in their environment
    or command line. Zombies are not counted: they have ended and only wait for init to reap them."""
    marker = str(tmp_path).encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours
            continue
        if state != b"Z" and int(pid) != os.getpid() and (marker in environ or marker in cmdline):
            command = cmdline.replace(b"\0", b" ")[:160].decode(errors="replace")
            found.append(f"{pid}: {command}")
    return found


def assert_no_leftovers(tmp_path, within_s: float = 15) -> None:
    deadline = time.time() + within_s
    while leftover_processes(tmp_path) and time.time() < deadline:
        time.sleep(0.5)
    assert leftover_processes(tmp_path) == []


def test_sigterm_mid_evaluation_stops_within_seconds_and_keeps_the_finished_shard(slow_evaluate_config, home,
                                                                                   tmp_path):
    pattern = "evaluate/*/predictions/part-*.parquet"
    process = start_alone(home, tmp_path, slow_evaluate_config)
    wait_for(home, pattern, process)
    time.sleep(2)  # the second shard's first action is sleeping in the sandbox now
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    output, _ = process.communicate(timeout=60)
    # Before: Prefect waited for the running shard (here 60 s or more) before exiting.
    assert time.monotonic() - sent < 40, output  # ~1 s idle; the bound leaves room for a loaded machine
    assert process.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM: finished parts are kept" in output
    assert [p.name for p in home.glob(pattern)] == ["part-00000.parquet"]
    assert not list(home.glob("evaluate/*/manifest.json"))
    assert_no_leftovers(tmp_path)


def test_sigkill_leaves_no_process_behind(slow_evaluate_config, home, tmp_path):
    process = start_alone(home, tmp_path, slow_evaluate_config)
    wait_for(home, "evaluate/*/predictions/part-*.parquet", process)
    assert leftover_processes(tmp_path)  # the stage, its reaper, Prefect's server, a sandbox worker
    process.kill()  # only the stage's process: its children are not signalled
    process.wait()
    # Before: Prefect's temporary server (uvicorn) stayed alive, orphaned, for as long as anyone looked.
    assert_no_leftovers(tmp_path)


# ----------------------------------------------------------------------------- temporary files

def test_a_run_killed_and_rerun_leaves_tmpdir_as_it_found_it(rollout_config, home, tmp_path):
    """The sandbox's folders (and llama.cpp's slot files and log, not run here) live in the run's scratch
    folder: gone after a SIGKILL (the reaper sweeps it) and after a finished run (removed at exit)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp / "someone-elses.txt").write_text("kept")
    # This test process's own scratch folder (if any) is not handed down: the stage makes its own in `tmp`.
    env = {**{k: v for k, v in os.environ.items() if k != SCRATCH_VARIABLE}, "TMPDIR": str(tmp)}
    command = [sys.executable, "-m", "flows.cli", "--home", str(home), "rollout", "--config", str(rollout_config)]
    pattern = "rollout/*/episodes/part-*.parquet"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    wait_for(home, pattern, process)
    assert [p.name for p in tmp.glob("distillery-*")]  # the run's scratch, holding the sandbox's folder
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.time() + 30  # the reaper stops the stage's children, then sweeps
    while len(list(tmp.iterdir())) > 1 and time.time() < deadline:
        time.sleep(0.5)
    assert [p.name for p in tmp.iterdir()] == ["someone-elses.txt"]
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [p.name for p in tmp.iterdir()] == ["someone-elses.txt"]
