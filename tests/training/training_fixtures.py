"""Synthetic training data shared by the training tests (a helper module, not a test module)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq

from services.processes import PROJECT_ROOT
from storage.schemas import SFT_EXAMPLES, rows_to_table
from training.examples import agent_messages

CONFIGS = PROJECT_ROOT / "configs" / "accelerate"
SYSTEM = "You solve tasks with Python code. End with final_answer(x)."


def make_examples(count: int, seed: int = 0) -> list[list[dict]]:
    """Synthetic agent trajectories of varied length (1-3 steps), deterministic in ``seed``."""
    rng = random.Random(seed)
    examples = []
    for index in range(count):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        steps = []
        for step in range(rng.randint(1, 3)):
            words = " ".join(rng.choice(["sum", "compute", "check", "value", "then"]) for _ in range(rng.randint(3, 30)))
            steps.append((f"Thought: {words}.\nCode:\n```py\nx = {a} + {b} + {step}\nprint(x)\n```<end_code>",
                          f"Observation:\n{a + b + step}"))
        steps[-1] = (f"Thought: done.\nCode:\n```py\nfinal_answer({a + b})\n```<end_code>", "")
        examples.append(agent_messages(SYSTEM, f"Question {index}: what is {a} + {b}?", steps))
    return examples


def write_examples(path: Path, examples: list[list[dict]]) -> Path:
    """``examples`` as an SFT_EXAMPLES Parquet file (question ids q0, q1, …), the training stage's input."""
    rows = [{"question_id": f"q{i}", "sample_index": 0, "dataset": "synthetic", "kind": "agent",
             "messages_json": json.dumps(messages)} for i, messages in enumerate(examples)]
    pq.write_table(rows_to_table(rows, SFT_EXAMPLES), path)
    return path
