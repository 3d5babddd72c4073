"""A hand-built predictions table shared by the metrics and report tests (a helper module, not a test module)."""

from __future__ import annotations

import json

import pyarrow as pa

from storage.schemas import PREDICTIONS, rows_to_table

ADAPTER = "0123456789abcdef"


def steps_json(*kinds: str) -> str:
    """A ``steps_json`` value: one step per kind, numbered from 1."""
    return json.dumps([{"step": i + 1, "error_kind": kind} for i, kind in enumerate(kinds)])


def prediction_row(model, adapter, method, dataset, qid, correct, steps, rc, pe, ee, tokens, *, excluded=False,
                   em=None, f1=None, level=None, kinds=None) -> dict:
    """One PREDICTIONS row of evaluation ``eval1``: rc/pe/ee are retrieval calls, parse and execution errors,
    ``tokens`` is (prompt, completion)."""
    return {
        "artifact_id": "eval1", "model": model, "adapter": adapter, "method": method, "dataset": dataset,
        "question_id": qid, "sample_index": 0, "correct": correct, "score": float(correct),
        "excluded": excluded, "em": em, "f1": f1, "num_steps": steps, "retrieval_calls": rc,
        "parse_errors": pe, "exec_errors": ee, "prompt_tokens": tokens[0], "completion_tokens": tokens[1],
        "level": level, "steps_json": steps_json(*kinds) if kinds is not None else None,
    }


def sample_rows() -> list[dict]:
    """Two models, three model·method rows, two datasets (levels on "math"), one excluded question."""
    teacher, student = ("qwen-32b", None, "agent"), ("smollm2", ADAPTER, "agent-sag")
    cot = ("smollm2", None, "cot")
    return [
        prediction_row(*teacher, "math", "m1", True, 2, 0, 0, 1, (100, 20), level="Level 1", kinds=("execution", "none")),
        prediction_row(*teacher, "math", "m2", False, 3, 1, 1, 0, (200, 40), level="Level 2",
             kinds=("parse", "none", "none")),
        prediction_row(*teacher, "facts", "f1", True, 2, 2, 0, 0, (150, 30), em=1.0, f1=1.0, kinds=("none", "none")),
        # No gold: not scored, but its behaviour (steps, calls, tokens) still counts.
        prediction_row(*teacher, "facts", "f2", False, 1, 1, 0, 0, (50, 10), excluded=True, kinds=("none",)),
        prediction_row(*student, "math", "m1", True, 1, 0, 0, 0, (80, 20), level="Level 1", kinds=("none",)),
        # A timeout is neither a parse nor an execution error in the counts.
        prediction_row(*student, "math", "m2", True, 2, 0, 0, 0, (90, 30), level="Level 2", kinds=("timeout", "none")),
        prediction_row(*student, "facts", "f1", False, 4, 3, 1, 1, (300, 100), em=0.0, f1=0.5,
             kinds=("parse", "execution", "none", "forbidden")),
        # A baseline without retrieval: retrieval_calls is null.
        prediction_row(*cot, "math", "m1", False, 1, None, 0, 0, (60, 40), level="Level 1", kinds=("none",)),
        prediction_row(*cot, "math", "m2", True, 1, None, 0, 0, (60, 60), level="Level 2", kinds=("none",)),
    ]


def sample_predictions(rows: list[dict] | None = None) -> pa.Table:
    return rows_to_table(sample_rows() if rows is None else rows, PREDICTIONS)
