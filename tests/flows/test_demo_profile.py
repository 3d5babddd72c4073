"""The demo profile (configs/demo.yaml, what `make demo` runs) end to end at a tiny scale: the teacher on
llama.cpp with the full teacher prompt, the paper's filter, SmolLM2 trained with LoRA, every row of its table;
and a second run of the same command is a cache hit that writes nothing.

The teacher is the profile's backend with the 0.5B Qwen2.5-Coder in place of the 1.5B (the smallest model that
proves the profile's wiring: about twice as fast on a 2-core CPU); the 1.5B teacher on llama.cpp runs in the
study profile's test (tests/flows/test_study_profile.py), with the same backend."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flows_fixtures import CORPUS

from storage.catalog import query

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a whole run on real models: longer than the suite's default (pyproject.toml)
def test_the_demo_profile_runs_end_to_end_and_a_second_run_is_a_cache_hit(tmp_path, home):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(doc) + "\n" for doc in CORPUS))
    easy = tmp_path / "easy.jsonl"  # so that the teacher solves some and the filter keeps something
    easy.write_text("".join(json.dumps({"id": f"e{i}", "question": q, "answer": a}) + "\n" for i, (q, a) in
                            enumerate([("What is 17 + 25?", "42"), ("What is 9 * 8?", "72")])))
    overrides = [
        f"index.corpus.source={corpus}",
        "teacher.model=qwen2.5-coder-0.5b-instruct",
        "sandbox.workers=1",
        "teacher.slots=2", "student.slots=2",
        f'rollout.datasets=[{{name: easy, source: "{easy}", kind: math}}]',
        "rollout.agent.max_steps=1", "rollout.agent.max_new_tokens=128",
        "train.epochs=1", "train.grad_accum=1", "train.max_length=768",
        'evaluate.datasets=[{name: arith, source: "builtin:arith", split: test, kind: math, num_questions: 1}]',
        "evaluate.agent.max_steps=1", "evaluate.agent.max_new_tokens=64", "evaluate.cot_max_new_tokens=64",
    ]
    command = [sys.executable, "-m", "flows.cli", "--home", str(home), "run"]  # no --config: the demo profile
    for override in overrides:
        command += ["--set", override]

    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "results/cpu-study" in done.stdout + done.stderr  # the demo says where the study's results are
    stages = dict(query(home, "select stage, count(*) from artifacts group by all")[1])
    assert stages == {"index": 1, "rollout": 1, "sft": 1, "train": 1, "evaluate": 1}
    [(episodes, correct)] = query(home, "select count(*), sum(correct::int) from episodes where stage = "
                                        "'rollout'")[1]
    assert episodes == 2 and correct >= 1  # the teacher solves some
    [(kept,)] = query(home, "select count(*) from sft_examples")[1]
    assert kept == correct  # the paper's filter: only correct trajectories are trained on
    rows = dict(query(home, "select method, model from metrics")[1])
    assert rows == {"teacher-agent": "qwen2.5-coder-0.5b-instruct", "cot": "smollm2-135m-instruct",
                    "agent": "smollm2-135m-instruct", "agent-distilled": "smollm2-135m-instruct",
                    "agent-distilled+sag": "smollm2-135m-instruct"}
    files = sorted(p.relative_to(home) for p in home.rglob("*") if p.is_file() and "prefect" not in p.parts[0])
    mtimes = {p: (home / p).stat().st_mtime_ns for p in files}

    again = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "cached: every stage with this config already exists" in again.stderr
    assert dict(query(home, "select stage, count(*) from artifacts group by all")[1]) == stages
    assert {p: (home / p).stat().st_mtime_ns for p in files} == mtimes
