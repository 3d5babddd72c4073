"""``distillery evaluate`` with the teacher on the ``llamacpp`` backend (a real GGUF: the embedded SmolLM2),
and what a killed llama.cpp server does to a running evaluation: one error naming the backend, exit 2,
finished shards kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from storage.catalog import query

CONFIG = """
index: {{corpus: {{source: "{corpus}"}}, embedder: minilm-l6-v2}}
sandbox: {{workers: 1}}
teacher: {{kind: llamacpp, model: smollm2-135m-instruct, slots: 2, ctx_per_slot: 2048, max_retries: 1}}
evaluate:
  datasets: [{{name: arith, source: "builtin:arith", split: test, kind: math, num_questions: {questions}}}]
  methods:
    - {{name: teacher-cot, model: teacher, mode: cot}}
    - {{name: teacher-agent, model: teacher, mode: agent, prompt: student}}
  agent: {{prompt: student, max_steps: 1, max_new_tokens: 48}}
  cot_max_new_tokens: 64
  num_shards: {shards}
  max_workers: 1
reevaluate: {{enabled: false}}
"""


def write_config(tmp_path, questions: int, shards: int):
    import json

    from flows_fixtures import CORPUS

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(doc) + "\n" for doc in CORPUS))
    config = tmp_path / "llamacpp.yaml"
    config.write_text(CONFIG.format(corpus=corpus, questions=questions, shards=shards))
    return config


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the stage's own budget below; longer than the suite's default
def test_evaluate_with_the_teacher_on_llamacpp_answers_questions(tmp_path, home):
    config = write_config(tmp_path, questions=4, shards=1)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "--home", str(home), "evaluate", "--config",
                           str(config)], capture_output=True, text=True, check=False, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = sorted(query(home, "select method, model, n from metrics")[1])
    assert rows == [("teacher-agent", "smollm2-135m-instruct", 4), ("teacher-cot", "smollm2-135m-instruct", 4)]
    [(answered, tokens)] = query(home, "select count(prediction), min(completion_tokens) from predictions "
                                       "where method = 'teacher-cot'")[1]
    assert answered >= 1 and tokens > 0  # the model generated text, and CoT answers were extracted


def server_pids(parent: int) -> list[int]:
    import psutil

    try:
        children = psutil.Process(parent).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c.pid for c in children if "agent_runtime.backends.llamacpp_server" in " ".join(c.cmdline())]


@pytest.mark.slow
def test_a_killed_llamacpp_server_fails_the_stage_naming_the_backend_and_keeps_finished_shards(tmp_path, home):
    config = write_config(tmp_path, questions=12, shards=6)
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "--home", str(home), "evaluate", "--config",
                                str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 1200
    while not list(home.glob("evaluate/*/predictions/*.parquet")):
        assert process.poll() is None and time.monotonic() < deadline, "no shard finished"
        time.sleep(0.5)
    finished = {p.name for p in home.glob("evaluate/*/predictions/*.parquet")}
    [pid] = server_pids(process.pid)
    os.kill(pid, signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 2, stdout[-2000:] + stderr[-3000:]
    [error] = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert "llamacpp:smollm2-135m-instruct: the llama.cpp server" in error
    assert f"(pid {pid}) was killed by signal 9" in error and "Traceback" not in stderr
    assert finished <= {p.name for p in home.glob("evaluate/*/predictions/*.parquet")}  # finished shards kept
    assert not list(home.glob("evaluate/*/manifest.json"))
    assert server_pids(process.pid) == []
