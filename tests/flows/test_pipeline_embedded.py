"""The whole pipeline on the embedded models, at the smallest scale that still runs every stage for real:
`distillery run` in a subprocess, SmolLM2-135M as teacher and student through the transformers backend,
MiniLM + FAISS over a 5-document corpus, the subprocess sandbox, LoRA training, evaluation and report."""

import json
import subprocess
import sys

import pytest
from flows_fixtures import CORPUS

from storage.catalog import query


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a whole run on real models: longer than the suite's default (pyproject.toml)
def test_distillery_run_on_the_embedded_models(tmp_path, home):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(doc) + "\n" for doc in CORPUS))
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""
index: {{corpus: {{source: "{corpus}"}}, embedder: minilm-l6-v2}}
sandbox: {{workers: 1}}
teacher: {{kind: transformers, model: smollm2-135m-instruct}}
student: {{kind: transformers, model: smollm2-135m-instruct}}
rollout:
  datasets: [{{name: arith, source: "builtin:arith", split: train, kind: math, num_questions: 2}}]
  num_parts: 1
  agent: {{prompt: student, max_steps: 1, max_new_tokens: 24, temperature: 0.7}}
sft: {{require_correct: false, drop_parse_errors: false}}
train: {{base_model: smollm2-135m-instruct, epochs: 1, max_length: 512, per_device_batch_size: 2, grad_accum: 1,
         lora: {{r: 4, alpha: 8}}}}
evaluate:
  datasets: [{{name: facts, source: "builtin:facts", split: test, kind: qa, limit: 2}}]
  methods:
    - {{name: cot, model: student, mode: cot}}
    - {{name: agent-distilled, model: agent_student, mode: agent}}
  agent: {{prompt: student, max_steps: 1, max_new_tokens: 24}}
  cot_max_new_tokens: 24
  num_shards: 1
reevaluate: {{enabled: false}}
""")
    done = subprocess.run([sys.executable, "-m", "flows.cli", "--home", str(home), "run", "--config", str(config)],
                          check=False, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| Model · method |" in done.stdout  # the report table is printed
    stages = dict(query(home, "select stage, count(*) from artifacts group by all")[1])
    assert stages == {"index": 1, "rollout": 1, "sft": 1, "train": 1, "evaluate": 1}
    assert query(home, "select count(*), count(distinct question_id) from episodes")[1] == [(2, 2)]
    assert query(home, "select count(*) from sft_examples")[1] == [(2,)]
    [(adapter_id, parents)] = query(home, "select id, parents from artifacts where stage = 'train'")[1]
    [(data_id,)] = query(home, "select id from artifacts where stage = 'sft'")[1]
    assert data_id in parents
    assert sorted(query(home, "select method, dataset, n from metrics")[1]) == [
        ("agent-distilled", "facts", 2), ("cot", "facts", 2)]
    assert query(home, "select count(*) from losses")[1][0][0] >= 1
    reports = list(home.glob("evaluate/*/report.md"))
    assert len(reports) == 1 and "agent-distilled" in reports[0].read_text()
    assert list(reports[0].parent.glob("*.png"))
    assert (home / "train" / adapter_id / "adapter" / "adapter_model.safetensors").is_file()
