"""The study profile (configs/cpu-study.yaml) end to end at a tiny scale, on its real models: the
Qwen2.5-Coder-1.5B teacher and the 0.5B student on llama.cpp, FTP prefixes, the paper's filter (correct
trajectories only), agent- and CoT-distilled students trained with LoRA, and every row of its table."""

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
def test_the_study_profile_runs_end_to_end_at_a_tiny_scale(tmp_path, home):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(doc) + "\n" for doc in CORPUS))
    # Easy questions, so that the teacher's CoT (the CoT student's data) and its agent both get some right.
    easy = tmp_path / "easy.jsonl"
    easy.write_text("".join(json.dumps({"id": f"e{i}", "question": q, "answer": a}) + "\n" for i, (q, a) in
                            enumerate([("What is 17 + 25?", "42"), ("What is 9 * 8?", "72"),
                                       ("What is 100 - 37?", "63")])))
    # One optimizer step on one example per student: what is proven is that the real 0.5B trains with LoRA and its
    # adapter serves; more steps add minutes on a CPU without native bf16.
    tiny_lora = "{epochs: 1, max_steps: 1, max_length: 1024, per_device_batch_size: 1, grad_accum: 1, lora: {r: 4, alpha: 8}}"
    overrides = [
        f"index.corpus.source={corpus}",
        "sandbox.workers=1",
        "teacher.slots=3", "student.slots=2",
        "prefixes.max_new_tokens=160",
        f'rollout.datasets=[{{name: easy, source: "{easy}", kind: math}}]',
        "rollout.num_parts=1", "rollout.agent.max_steps=2", "rollout.agent.max_new_tokens=160",
        "sft.drop_parse_errors=false",
        f"train={{base_model: qwen2.5-coder-0.5b-instruct, checkpoint_every: 100, {tiny_lora[1:-1]}}}",
        f"cot_student.train={{base_model: qwen2.5-coder-0.5b-instruct, {tiny_lora[1:-1]}}}",
        'evaluate.datasets=[{name: arith, source: "builtin:arith", split: test, kind: math, num_questions: 1}]',
        "evaluate.agent.max_steps=1", "evaluate.agent.max_new_tokens=64", "evaluate.cot_max_new_tokens=64",
        "evaluate.sag.n=2",
        # The profile's rows but the on-policy ones (agent-opd, agent-opd+sag): scoring with the 1.5B teacher on
        # transformers and two updates of the 0.5B would add minutes; tests/flows/test_opd_stage.py runs the
        # stage end to end on tiny models, and the study runs it on these.
        "evaluate.methods=[" + ", ".join(
            "{{name: {}, model: {}, mode: {}{}}}".format(*row) for row in [
                ("cot", "student", "cot", ""), ("agent", "student", "agent", ", prompt: teacher"),
                ("cot-distilled", "cot_student", "cot", ""), ("cot-distilled+rag", "cot_student", "cot", ", rag: true"),
                ("agent-distilled", "agent_student", "agent", ""),
                ("agent-distilled+sag", "agent_student", "agent", ", sag: true"),
                ("teacher-cot", "teacher", "cot", ", limit: 25"),
                ("teacher-agent", "teacher", "agent", ", prompt: teacher, limit: 25")]) + "]",
    ]
    command = [sys.executable, "-m", "flows.cli", "--home", str(home), "run", "--config",
               str(ROOT / "configs" / "cpu-study.yaml")]
    for override in overrides:
        command += ["--set", override]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    stages = dict(query(home, "select stage, count(*) from artifacts group by all")[1])
    assert stages == {"index": 1, "prefixes": 1, "rollout": 1, "sft": 2, "train": 2, "evaluate": 1}
    [(episodes, correct)] = query(home, "select count(*), sum(correct::int) from episodes")[1]
    assert episodes == 3 and correct >= 1  # the teacher solves some, so the paper's filter keeps some
    [(kept,)] = query(home, "select count(*) from sft_examples where kind = 'agent'")[1]
    assert kept == correct
    rows = sorted(query(home, "select method, model, n from metrics")[1])
    assert [method for method, _, _ in rows] == sorted([
        "cot", "agent", "cot-distilled", "cot-distilled+rag", "agent-distilled", "agent-distilled+sag",
        "teacher-cot", "teacher-agent"])
    assert all(n == 1 for _, _, n in rows)
    models = {method: model for method, model, _ in rows}
    assert models["teacher-agent"] == "qwen2.5-coder-1.5b-instruct" and models["cot"] == "qwen2.5-coder-0.5b-instruct"
    for adapter in home.glob("train/*/adapter"):
        assert (adapter / "adapter_model.safetensors").is_file()
