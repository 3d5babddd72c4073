"""compute_metrics on a hand-built predictions table: exact values, grouping, order and bad input."""

from __future__ import annotations

import pytest
from evaluation_fixtures import ADAPTER, prediction_row, sample_predictions, sample_rows

from evaluation.grading import GRADER_VERSION
from evaluation.metrics import PredictionsError, compute_metrics
from storage.schemas import METRICS

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
    rows.append(prediction_row("smollm2", None, "agent-sag", "math", "m3", True, 1, 0, 0, 0, (1, 1)))
    metrics = compute_metrics(sample_predictions(rows), "x").to_pylist()
    keys = [(r["model"], r["adapter"], r["method"], r["dataset"]) for r in metrics]
    assert ("smollm2", None, "agent-sag", "math") in keys
    assert ("smollm2", ADAPTER, "agent-sag", "math") in keys
    assert len(keys) == len(set(keys)) == len(EXPECTED) + 1
    # Within a model the baseline rows (no adapter) come before adapter rows.
    assert keys.index(("smollm2", None, "agent-sag", "math")) < keys.index(("smollm2", ADAPTER, "agent-sag", "math"))


def test_all_excluded_group_has_null_accuracy_and_zero_n():
    rows = [prediction_row("m", None, "agent", "d", "q", False, 2, 1, 0, 0, (5, 5), excluded=True)]
    (row,) = compute_metrics(sample_predictions(rows), "x").to_pylist()
    assert (row["n"], row["n_excluded"], row["accuracy"], row["em"]) == (0, 1, None, None)
    assert (row["mean_steps"], row["tokens_per_question"]) == (2.0, 10.0)


def test_zero_steps_give_null_error_rates():
    rows = [prediction_row("m", None, "agent", "d", "q", False, 0, 0, 0, 0, (5, 0))]
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
        {**prediction_row("m", None, "cot", "math", q, correct, 0, 0, 0, 0, (5, 5)), "grade_method": method}
        for q, correct, method in [("q1", False, "timeout"), ("q2", True, "numeric"), ("q3", False, "timeout"),
                                   ("q4", False, "math_verify")]
    ]
    rows.append({**prediction_row("m", None, "cot", "math", "q5", False, 0, 0, 0, 0, (5, 5), excluded=True),
                 "grade_method": "no_gold"})
    (row,) = compute_metrics(sample_predictions(rows), "x").to_pylist()
    assert (row["n"], row["accuracy"], row["grade_timeouts"]) == (4, 0.25, 2)
    assert row["grader_version"] == GRADER_VERSION
    assert {r["grade_timeouts"] for r in compute_metrics(sample_predictions(), "x").to_pylist()} == {0}
