"""Aggregate per-question predictions into the metrics table: one row per (model, adapter, method, dataset).

Pure: ``compute_metrics(predictions, artifact_id)`` reads a table with the columns of
``storage.schemas.PREDICTIONS`` and returns a table cast to ``storage.schemas.METRICS``. The evaluation
task writes it as ``metrics.parquet``; ``evaluation.report`` turns it into the Table-2 report.

Two populations, on purpose:
- answer metrics (``n``, ``accuracy``, ``em``, ``f1``) are over the *scored* episodes, i.e. those with a
  gold answer (``excluded`` false); ``n_excluded`` counts the others;
- behaviour metrics (``mean_steps``, ``retrieval_calls``, error rates, ``tokens_per_question``) are over
  *every* episode of the group, scored or not, because what an episode costs and how it fails does not
  depend on whether its gold answer is known.

Every row records the :data:`evaluation.grading.GRADER_VERSION` that scored the predictions.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

from common.errors import UserError
from evaluation.grading import GRADER_VERSION
from storage.schemas import METRICS, rows_to_table

# Without these a row cannot be placed in a group or scored.
REQUIRED_COLUMNS = ("question_id", "model", "method", "dataset", "correct", "excluded", "num_steps")
# Without these the corresponding metric is null (e.g. em/f1 for math, retrieval calls of a baseline).
OPTIONAL_COLUMNS = (
    "adapter", "em", "f1", "retrieval_calls", "parse_errors", "exec_errors",
    "prompt_tokens", "completion_tokens", "grade_method",
)

GroupKey = tuple[str, "str | None", str, str]


class PredictionsError(UserError, ValueError):
    """A predictions table that cannot be aggregated; the message names the row and question."""


def group_sort_key(model: str, adapter: str | None, method: str, dataset: str = "") -> tuple:
    """The order of metric rows (and of report rows): model, then no adapter before adapters, method, dataset."""
    return (model, adapter is not None, adapter or "", method, dataset)


def compute_metrics(predictions: pa.Table, artifact_id: str) -> pa.Table:
    """One metrics row per (model, adapter, method, dataset), sorted by :func:`group_sort_key`.

    Per group (a null adapter, as for baselines, is its own group value):

    - ``n``: scored episodes (``excluded`` false); ``n_excluded``: episodes without a gold answer.
    - ``accuracy``: mean of ``correct`` over scored episodes (null when ``n`` is 0).
    - ``em`` / ``f1``: mean over scored episodes where the value is not null; null when there is none
      (math datasets record neither).
    - ``mean_steps``: mean ``num_steps`` (actions taken, the finalising one included) over all episodes.
    - ``retrieval_calls``: mean ``retrieval_calls`` per episode over all episodes that record it.
    - ``parse_error_rate``: the fraction of steps whose kept action had a parse error, pooled over the
      group: ``sum(parse_errors) / sum(num_steps)`` over episodes that record ``parse_errors``; null
      when those episodes took no step. ``exec_error_rate`` likewise with ``exec_errors``.
    - ``tokens_per_question``: mean of ``prompt_tokens + completion_tokens`` over all episodes that
      record both.
    - ``grade_timeouts``: scored episodes graded incorrect because symbolic grading hit its time limit
      (``grade_method`` "timeout").
    - ``grader_version``: :data:`evaluation.grading.GRADER_VERSION`, the grader of these predictions.

    Raises :class:`PredictionsError` for a missing required column, a null group key, a null
    ``excluded``, a scored episode with null ``correct``, or error counts above ``num_steps``.
    """
    groups: dict[GroupKey, list[dict]] = {}
    for row in prediction_records(predictions):
        key = (row["model"], row["adapter"], row["method"], row["dataset"])
        groups.setdefault(key, []).append(row)
    ordered = sorted(groups, key=lambda key: group_sort_key(*key))
    return rows_to_table([_group_metrics(key, groups[key], artifact_id) for key in ordered], METRICS)


def prediction_records(predictions: pa.Table, extra_columns: Iterable[str] = ()) -> list[dict]:
    """Validated rows of a predictions table as dicts with the required, optional and ``extra_columns``.

    Optional or extra columns missing from the table come back as None.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in predictions.column_names]
    if missing:
        raise PredictionsError(
            f"predictions lack required column(s) {missing}; expected the storage.schemas.PREDICTIONS columns"
        )
    wanted = list(dict.fromkeys([*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS, *extra_columns]))
    present = [c for c in wanted if c in predictions.column_names]
    rows = predictions.select(present).to_pylist()
    for index, row in enumerate(rows):
        for column in wanted:
            row.setdefault(column, None)
        _check_row(index, row)
    return rows


def _check_row(index: int, row: dict) -> None:
    where = f"predictions row {index} (question {row['question_id']!r}, dataset {row['dataset']!r})"
    for column in ("model", "method", "dataset"):
        if row[column] is None:
            raise PredictionsError(f"{where}: {column} is null")
    if row["excluded"] is None:
        raise PredictionsError(f"{where}: excluded is null; it must say whether the question has a gold answer")
    if not row["excluded"] and row["correct"] is None:
        raise PredictionsError(f"{where}: a scored row (excluded=false) has a null 'correct'")
    steps = row["num_steps"]
    if steps is None or steps < 0:
        raise PredictionsError(f"{where}: num_steps must be a count >= 0, got {steps!r}")
    for column in ("parse_errors", "exec_errors", "retrieval_calls"):
        value = row[column]
        if value is not None and value < 0:
            raise PredictionsError(f"{where}: {column} must be >= 0, got {value}")
    for column in ("parse_errors", "exec_errors"):
        # The rates are fractions of steps, so each step can count at most one error of a kind.
        if row[column] is not None and row[column] > steps:
            raise PredictionsError(f"{where}: {column}={row[column]} exceeds num_steps={steps}")


def _group_metrics(key: GroupKey, rows: list[dict], artifact_id: str) -> dict:
    model, adapter, method, dataset = key
    scored = [r for r in rows if not r["excluded"]]
    tokens = [
        r["prompt_tokens"] + r["completion_tokens"]
        for r in rows
        if r["prompt_tokens"] is not None and r["completion_tokens"] is not None
    ]
    return {
        "artifact_id": artifact_id,
        "model": model,
        "adapter": adapter,
        "method": method,
        "dataset": dataset,
        "n": len(scored),
        "n_excluded": len(rows) - len(scored),
        "accuracy": _mean([float(r["correct"]) for r in scored]),
        "em": _mean([r["em"] for r in scored if r["em"] is not None]),
        "f1": _mean([r["f1"] for r in scored if r["f1"] is not None]),
        "mean_steps": _mean([r["num_steps"] for r in rows]),
        "retrieval_calls": _mean([r["retrieval_calls"] for r in rows if r["retrieval_calls"] is not None]),
        "parse_error_rate": _step_rate(rows, "parse_errors"),
        "exec_error_rate": _step_rate(rows, "exec_errors"),
        "tokens_per_question": _mean(tokens),
        "grade_timeouts": sum(1 for r in scored if r["grade_method"] == "timeout"),
        "grader_version": GRADER_VERSION,
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _step_rate(rows: list[dict], column: str) -> float | None:
    """Errors of one kind per step, pooled over the episodes that record the count."""
    counted = [r for r in rows if r[column] is not None]
    steps = sum(r["num_steps"] for r in counted)
    return sum(r[column] for r in counted) / steps if steps else None
