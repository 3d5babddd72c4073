"""Evaluation survives SIGKILL: a re-run skips the finished shards and predicts every question once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from storage.catalog import query

ACTION = "Thought: answer.\nCode:\n```py\nimport time\ntime.sleep(1.0)\nfinal_answer('4')\n```<end_code>"


@pytest.fixture
def evaluate_config(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "title": f"T{i}", "text": f"text {i}"}) + "\n"
                              for i in range(4)))
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + 4 - {i}?", "answer": "4"})
                                 + "\n" for i in range(12)))
    script = tmp_path / "script.json"
    script.write_text(json.dumps([ACTION] * 100))
    config = tmp_path / "evaluate.yaml"
    config.write_text(f"""
index: {{corpus: {{source: "{corpus}"}}}}
sandbox: {{workers: 1}}
student: {{kind: scripted, model: scripted, script: "{script}"}}
train: {{base_model: scripted}}
evaluate:
  datasets: [{{name: sums, source: "{questions}", kind: math}}]
  methods: [{{name: agent, model: student, mode: agent}}]
  num_shards: 6
  max_workers: 1
  agent: {{max_steps: 2}}
""")
    return config


def run_evaluate(config, home):
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "--home", str(home), "evaluate", "--config",
                             str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_sigkill_mid_evaluation_then_rerun_predicts_every_question_once(evaluate_config, home):
    process = run_evaluate(evaluate_config, home)
    shards = []
    deadline = time.time() + 900
    while time.time() < deadline and process.poll() is None:
        shards = list(home.glob("evals/*/predictions/part-*.parquet"))
        if shards:
            break
        time.sleep(0.2)
    assert shards, f"no shard was written before the deadline:\n{process.stdout.read() if process.poll() else ''}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not list(home.glob("evals/*/manifest.json"))  # killed before finishing
    done_before = {p.name: p.stat().st_mtime_ns for p in home.glob("evals/*/predictions/part-*.parquet")}
    assert 0 < len(done_before) < 6

    again = run_evaluate(evaluate_config, home)
    output, _ = again.communicate(timeout=900)
    assert again.returncode == 0, output
    after = {p.name: p.stat().st_mtime_ns for p in home.glob("evals/*/predictions/part-*.parquet")}
    assert len(after) == 6
    for name, mtime in done_before.items():  # finished shards were not redone
        assert after[name] == mtime
    rows = query(home, "select count(*), count(distinct question_id), sum(correct::int) from predictions")[1]
    assert rows == [(12, 12, 12)]
    assert query(home, "select method, dataset, n, accuracy from metrics")[1] == [("agent", "sums", 12, 1.0)]
