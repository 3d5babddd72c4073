"""compute_metrics on a hand-built predictions table: exact values, grouping, order and bad input."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from evaluation.grading import GRADER_VERSION
from evaluation.metrics import PredictionsError, compute_metrics
from storage.schemas import METRICS, PREDICTIONS, rows_to_table

ADAPTER = "0123456789abcdef"


def _steps(*kinds: str) -> str:
    return json.dumps([{"step": i + 1, "error_kind": kind} for i, kind in enumerate(kinds)])


def _row(model, adapter, method, dataset, qid, correct, steps, rc, pe, ee, tokens, *, excluded=False,
         em=None, f1=None, level=None, kinds=None) -> dict:
    return {
        "artifact_id": "eval1", "model": model, "adapter": adapter, "method": method, "dataset": dataset,
        "question_id": qid, "sample_index": 0, "correct": correct, "score": float(correct),
        "excluded": excluded, "em": em, "f1": f1, "num_steps": steps, "retrieval_calls": rc,
        "parse_errors": pe, "exec_errors": ee, "prompt_tokens": tokens[0], "completion_tokens": tokens[1],
        "level": level, "steps_json": _steps(*kinds) if kinds is not None else None,
    }


def sample_rows() -> list[dict]:
    """Two models, three model·method rows, two datasets (levels on "math"), one excluded question."""
    teacher, student = ("qwen-32b", None, "agent"), ("smollm2", ADAPTER, "agent-sag")
    cot = ("smollm2", None, "cot")
    return [
        _row(*teacher, "math", "m1", True, 2, 0, 0, 1, (100, 20), level="Level 1", kinds=("execution", "none")),
        _row(*teacher, "math", "m2", False, 3, 1, 1, 0, (200, 40), level="Level 2",
             kinds=("parse", "none", "none")),
        _row(*teacher, "facts", "f1", True, 2, 2, 0, 0, (150, 30), em=1.0, f1=1.0, kinds=("none", "none")),
        # No gold: not scored, but its behaviour (steps, calls, tokens) still counts.
        _row(*teacher, "facts", "f2", False, 1, 1, 0, 0, (50, 10), excluded=True, kinds=("none",)),
        _row(*student, "math", "m1", True, 1, 0, 0, 0, (80, 20), level="Level 1", kinds=("none",)),
        # A timeout is neither a parse nor an execution error in the counts.
        _row(*student, "math", "m2", True, 2, 0, 0, 0, (90, 30), level="Level 2", kinds=("timeout", "none")),
        _row(*student, "facts", "f1", False, 4, 3, 1, 1, (300, 100), em=0.0, f1=0.5,
             kinds=("parse", "execution", "none", "forbidden")),
        # A baseline without retrieval: retrieval_calls is null.
        _row(*cot, "math", "m1", False, 1, None, 0, 0, (60, 40), level="Level 1", kinds=("none",)),
        _row(*cot, "math", "m2", True, 1, None, 0, 0, (60, 60), level="Level 2", kinds=("none",)),
    ]


def sample_predictions(rows: list[dict] | None = None) -> pa.Table:
    return rows_to_table(sample_rows() if rows is None else rows, PREDICTIONS)


EXPECTED = [
    # model, adapter, method, dataset, n, n_excluded, accuracy, em, f1, mean_steps, retrieval_calls,
    # parse_error_rate, exec_error_rate, tokens_per_question
    ("qwen-32b", None, "agent", "facts", 1, 1, 1.0, 1.0, 1.0, 1.5, 1.5, 0.0, 0.0, 120.0),
    ("qwen-32b", None, "agent", "math", 2, 0, 0.5, None, None, 2.5, 0.5, 0.2, 0.2, 180.0),
    ("smollm2", None, "cot", "math", 2, 0, 0.5, None, None, 1.0, None, 0.0, 0.0, 110.0),
    ("smollm2", ADAPTER, "agent-sag", "facts", 1, 0, 0.0, 0.0, 0.5, 4.0, 3.0, 0.25, 0.25, 400.0),
    ("smollm2", ADAPTER, "agent-sag", "math", 2, 0, 1.0, None, None, 1.5, 0.0, 0.0, 0.0, 110.0),
]
COLUMNS = [
    "model", "adapter", "method", "dataset", "n", "n_excluded", "accuracy", "em", "f1", "mean_steps",
    "retrieval_calls", "parse_error_rate", "exec_error_rate", "tokens_per_question",
]


def test_exact_metric_rows_in_order():
    metrics = compute_metrics(sample_predictions(), "eval1")
    assert metrics.schema == METRICS
    assert metrics.column("artifact_id").to_pylist() == ["eval1"] * len(EXPECTED)
    got = [tuple(row[c] for c in COLUMNS) for row in metrics.to_pylist()]
    assert len(got) == len(EXPECTED)
    for row, expected in zip(got, EXPECTED):
        assert row[:6] == expected[:6]
        assert row[6:] == pytest.approx(expected[6:], abs=1e-12)


def test_row_order_does_not_depend_on_input_order():
    rows = sample_rows()
    forward = compute_metrics(sample_predictions(rows), "eval1")
    backward = compute_metrics(sample_predictions(rows[::-1]), "eval1")
    assert forward.equals(backward)


def test_null_adapters_form_one_group_apart_from_adapters():
    rows = sample_rows()
    rows.append(_row("smollm2", None, "agent-sag", "math", "m3", True, 1, 0, 0, 0, (1, 1)))
    metrics = compute_metrics(sample_predictions(rows), "x").to_pylist()
    keys = [(r["model"], r["adapter"], r["method"], r["dataset"]) for r in metrics]
    assert ("smollm2", None, "agent-sag", "math") in keys
    assert ("smollm2", ADAPTER, "agent-sag", "math") in keys
    assert len(keys) == len(set(keys)) == len(EXPECTED) + 1
    # Within a model the baseline rows (no adapter) come before adapter rows.
    assert keys.index(("smollm2", None, "agent-sag", "math")) < keys.index(("smollm2", ADAPTER, "agent-sag", "math"))


def test_all_excluded_group_has_null_accuracy_and_zero_n():
    rows = [_row("m", None, "agent", "d", "q", False, 2, 1, 0, 0, (5, 5), excluded=True)]
    (row,) = compute_metrics(sample_predictions(rows), "x").to_pylist()
    assert (row["n"], row["n_excluded"], row["accuracy"], row["em"]) == (0, 1, None, None)
    assert (row["mean_steps"], row["tokens_per_question"]) == (2.0, 10.0)


def test_zero_steps_give_null_error_rates():
    rows = [_row("m", None, "agent", "d", "q", False, 0, 0, 0, 0, (5, 0))]
    (row,) = compute_metrics(sample_predictions(rows), "x").to_pylist()
    assert row["parse_error_rate"] is None and row["exec_error_rate"] is None
    assert row["accuracy"] == 0.0


def test_empty_predictions_give_an_empty_metrics_table():
    metrics = compute_metrics(sample_predictions([]), "x")
    assert metrics.num_rows == 0 and metrics.schema == METRICS


def test_missing_required_column_is_named():
    table = sample_predictions().drop_columns(["excluded"])
    with pytest.raises(PredictionsError, match=r"required column\(s\) \['excluded'\]"):
        compute_metrics(table, "x")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"excluded": None}, "excluded is null"),
        ({"correct": None}, "null 'correct'"),
        ({"model": None}, "model is null"),
        ({"num_steps": None}, "num_steps must be a count"),
        ({"parse_errors": 5}, "parse_errors=5 exceeds num_steps=3"),
        ({"retrieval_calls": -1}, "retrieval_calls must be >= 0"),
    ],
)
def test_bad_rows_name_the_row_and_question(change, message):
    rows = sample_rows()
    rows[1].update(change)
    with pytest.raises(PredictionsError, match=message) as info:
        compute_metrics(sample_predictions(rows), "x")
    assert "predictions row 1 (question 'm2', dataset 'math')" in str(info.value)


def test_excluded_row_with_null_correct_is_fine():
    rows = sample_rows()
    rows[3]["correct"] = None  # the excluded facts question
    metrics = compute_metrics(sample_predictions(rows), "x").to_pylist()
    assert (metrics[0]["n"], metrics[0]["n_excluded"], metrics[0]["accuracy"]) == (1, 1, 1.0)


def test_grade_timeouts_are_counted_and_the_grader_version_recorded():
    rows = [
        {**_row("m", None, "cot", "math", q, correct, 0, 0, 0, 0, (5, 5)), "grade_method": method}
        for q, correct, method in [("q1", False, "timeout"), ("q2", True, "numeric"), ("q3", False, "timeout"),
                                   ("q4", False, "math_verify")]
    ]
    rows.append({**_row("m", None, "cot", "math", "q5", False, 0, 0, 0, 0, (5, 5), excluded=True),
                 "grade_method": "no_gold"})
    (row,) = compute_metrics(sample_predictions(rows), "x").to_pylist()
    assert (row["n"], row["accuracy"], row["grade_timeouts"]) == (4, 0.25, 2)
    assert row["grader_version"] == GRADER_VERSION
    assert {r["grade_timeouts"] for r in compute_metrics(sample_predictions(), "x").to_pylist()} == {0}
