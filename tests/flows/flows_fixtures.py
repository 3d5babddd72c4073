"""Inputs shared by the flow tests (a helper module, not a test module): corpora, question files, scripts,
configs."""

from __future__ import annotations

import json

from flows.config import PipelineConfig
from flows.settings import load_config

# Five documents: the pipeline tests' questions (Mars, Paris, arithmetic) each have one that answers them.
CORPUS = [
    {"id": "1", "title": "Mars", "text": "Mars is the fourth planet from the Sun, known as the Red Planet."},
    {"id": "2", "title": "Paris", "text": "Paris is the capital and largest city of France."},
    {"id": "3", "title": "Addition", "text": "Addition is one of the four basic operations of arithmetic."},
    {"id": "4", "title": "Jupiter", "text": "Jupiter is the largest planet in the Solar System."},
    {"id": "5", "title": "Berlin", "text": "Berlin is the capital of Germany."},
]

# The scripted teacher's action: sleep, then answer 4 (so that a stage can be killed while it works).
SLEEP_ACTION = ("Thought: answer.\nCode:\n```py\nimport time\ntime.sleep({seconds})\nfinal_answer('4')\n```"
                "<end_code>")


def write_inputs(tmp_path, seconds: float) -> dict[str, str]:
    """A 4-document corpus, 12 questions whose answer is 4, and a script that sleeps, then answers 4."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "title": f"T{i}", "text": f"text {i}"}) + "\n"
                              for i in range(4)))
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + 4 - {i}?", "answer": "4"})
                                 + "\n" for i in range(12)))
    script = tmp_path / "script.json"
    script.write_text(json.dumps([SLEEP_ACTION.format(seconds=seconds)] * 100))
    return {"corpus": str(corpus), "questions": str(questions), "script": str(script)}


def write_rollout_config(tmp_path, seconds: float, num_parts: int):
    """A rollout profile over ``write_inputs``: the scripted teacher sleeps ``seconds`` per question, one
    sandbox worker, the 12 questions in ``num_parts`` parts."""
    paths = write_inputs(tmp_path, seconds=seconds)
    config = tmp_path / "rollout.yaml"
    config.write_text(f"""
index: {{corpus: {{source: "{paths['corpus']}"}}}}
sandbox: {{workers: 1}}
teacher: {{kind: scripted, model: scripted, script: "{paths['script']}"}}
rollout:
  datasets: [{{name: sums, source: "{paths['questions']}", kind: math}}]
  num_parts: {num_parts}
  agent: {{max_steps: 2}}
""")
    return config


def demo(*overrides: str) -> PipelineConfig:
    """The demo profile with ``overrides`` (``key=value``, as ``--set`` takes them)."""
    return load_config(PipelineConfig, None, list(overrides))
