"""Rollouts survive SIGKILL: a re-run finishes without redoing finished parts or duplicating rows."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from storage.catalog import query

ACTION = "Thought: answer.\nCode:\n```py\nimport time\ntime.sleep(1.5)\nfinal_answer('4')\n```<end_code>"


@pytest.fixture
def rollout_config(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "title": f"T{i}", "text": f"text {i}"}) + "\n"
                              for i in range(4)))
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + 4 - {i}?", "answer": "4"})
                                 + "\n" for i in range(12)))
    script = tmp_path / "script.json"
    script.write_text(json.dumps([ACTION] * 100))
    config = tmp_path / "rollout.yaml"
    config.write_text(f"""
index: {{corpus: {{source: "{corpus}"}}}}
sandbox: {{workers: 1}}
teacher: {{kind: scripted, model: scripted, script: "{script}"}}
rollout:
  datasets: [{{name: sums, source: "{questions}", kind: math}}]
  num_parts: 6
  agent: {{max_steps: 2}}
""")
    return config


def run_rollout(config, home):
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "--home", str(home), "rollout", "--config",
                             str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_sigkill_mid_rollout_then_rerun_gives_every_question_once(rollout_config, home):
    process = run_rollout(rollout_config, home)
    parts = []
    deadline = time.time() + 900
    while time.time() < deadline and process.poll() is None:
        parts = list(home.glob("trajectories/*/episodes/part-*.parquet"))
        if parts:
            break
        time.sleep(0.5)
    assert parts, f"no part was written before the deadline:\n{process.stdout.read() if process.poll() else ''}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not list(home.glob("trajectories/*/manifest.json"))  # killed before finishing
    done_before = {p.name: p.stat().st_mtime_ns for p in home.glob("trajectories/*/episodes/part-*.parquet")}

    again = run_rollout(rollout_config, home)
    output, _ = again.communicate(timeout=900)
    assert again.returncode == 0, output
    # Finished parts were not redone; every question appears exactly once.
    for path in home.glob("trajectories/*/episodes/part-*.parquet"):
        if path.name in done_before:
            assert path.stat().st_mtime_ns == done_before[path.name]
    rows = query(home, "select count(*), count(distinct question_id), sum(correct::int) from episodes")[1]
    assert rows == [(12, 12, 12)]
    assert query(home, "select count(*) from steps")[1] == [(12,)]
