"""The report: exact Table-2 markdown, the detail table, the PNG files and what is left out when data is absent."""

from __future__ import annotations

import struct
from collections import Counter

import pyarrow as pa
import pytest
from evaluation_fixtures import ADAPTER, sample_predictions, sample_rows

from evaluation.grading import GRADER_VERSION
from evaluation.metrics import PredictionsError, compute_metrics, prediction_records
from evaluation.report import (
    _grader_line,
    _step_error_counts,
    detail_markdown,
    row_label,
    table2_markdown,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TABLE2 = (
    "| Model · method | facts | math | Average |\n"
    "|---|---:|---:|---:|\n"
    "| qwen-32b · agent | 100.0 | 50.0 | 75.0 |\n"
    "| smollm2 · cot | – | 50.0 | 50.0 |\n"
    "| smollm2 [01234567] · agent-sag | 0.0 | 100.0 | 50.0 |\n"
)
ALL_PLOTS = {"accuracy_by_dataset", "accuracy_by_level", "error_kinds", "retrieval_calls"}


def _metrics(rows: list[dict] | None = None) -> pa.Table:
    return compute_metrics(sample_predictions(rows), "eval1")


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_row_labels():
    assert row_label("qwen-32b", None, "agent") == "qwen-32b · agent"
    assert row_label("smollm2", ADAPTER, "sag") == "smollm2 [01234567] · sag"
    assert row_label("smollm2", f"/store/adapters/{ADAPTER}/", "sag") == "smollm2 [01234567] · sag"


def test_table2_exact_text():
    assert table2_markdown(_metrics()) == TABLE2


def test_table2_average_skips_datasets_without_accuracy():
    rows = sample_rows()
    # The teacher's only facts question becomes ungraded: its facts cell is empty, the average is math's.
    rows[2]["excluded"] = True
    lines = table2_markdown(_metrics(rows)).splitlines()
    assert lines[2] == "| qwen-32b · agent | – | 50.0 | 50.0 |"


def test_table2_escapes_pipes_and_rounds_to_one_decimal():
    rows = [
        {**r, "model": "a|b", "correct": c}
        for r, c in zip(sample_rows()[4:7], (True, False, True))
    ]
    rows.append({**rows[0], "question_id": "m3", "correct": False})  # math 1 of 3 correct
    text = table2_markdown(_metrics(rows))
    assert text.splitlines()[2] == "| a\\|b [01234567] · agent-sag | 100.0 | 33.3 | 66.7 |"


def test_detail_table_rows():
    lines = detail_markdown(_metrics()).splitlines()
    assert len(lines) == 2 + 5
    assert lines[2] == "| qwen-32b | - | agent | facts | 1 | 1 | 100.0 | 100.0 | 100.0 | 1.50 | 1.50 | 0.0 | 0.0 | 120 |"
    assert lines[4] == "| smollm2 | - | cot | math | 2 | 0 | 50.0 | – | – | 1.00 | – | 0.0 | 0.0 | 110 |"
    assert lines[5] == (
        "| smollm2 | 01234567 | agent-sag | facts | 1 | 0 | 0.0 | 0.0 | 50.0 | 4.00 | 3.00 | 25.0 | 25.0 | 400 |"
    )


def test_step_error_counts_from_steps_json():
    counts = _step_error_counts(prediction_records(sample_predictions(), extra_columns=("level", "steps_json")))
    assert counts[("qwen-32b", None, "agent")] == Counter(steps=8, parse=1, execution=1)
    assert counts[("smollm2", ADAPTER, "agent-sag")] == Counter(steps=7, parse=1, execution=1, timeout=1, other=1)
    assert counts[("smollm2", None, "cot")] == Counter(steps=2)


def test_write_report_writes_every_file(tmp_path):
    out = tmp_path / "eval"
    paths = write_report(out, _metrics(), sample_predictions(), title="Demo run")
    assert set(paths) == {"report"} | ALL_PLOTS
    for name in ALL_PLOTS:
        assert paths[name] == out / f"{name}.png"
        width, height = _png_size(paths[name].read_bytes())
        assert 500 <= width <= 2500 and 300 <= height <= 1500, (name, width, height)
    report = paths["report"].read_text()
    assert paths["report"] == out / "report.md"
    assert report.startswith("# Demo run\n")
    assert TABLE2 in report
    assert "| smollm2 | 01234567 | agent-sag | math | 2 | 0 | 100.0 |" in report
    for name in ALL_PLOTS:
        assert f"]({name}.png)" in report
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.md"] + [f"{n}.png" for n in ALL_PLOTS])


def test_report_names_the_grader_version_and_the_grading_timeouts(tmp_path):
    rows = sample_rows()
    rows[1]["grade_method"] = "timeout"  # qwen-32b's wrong math answer: symbolic grading hit the limit
    report = write_report(tmp_path, _metrics(rows), sample_predictions(rows))["report"].read_text()
    assert (f"Graded with grader version `{GRADER_VERSION}` (`evaluation.grading.GRADER_VERSION`). "
            "1 answer(s) hit the symbolic grading time limit and count as incorrect.") in report
    # Metrics written before grader versions were recorded read back with nulls in both columns.
    assert _grader_line([{"grader_version": None, "grade_timeouts": None}]) == (
        "Graded with grader version unrecorded (before version 2) (`evaluation.grading.GRADER_VERSION`)."
    )


def test_no_level_plot_without_levels(tmp_path):
    rows = [{**r, "level": None} for r in sample_rows()]
    (tmp_path / "accuracy_by_level.png").write_bytes(PNG_MAGIC)  # stale, from an earlier report
    paths = write_report(tmp_path, _metrics(rows), sample_predictions(rows))
    assert set(paths) == {"report"} | (ALL_PLOTS - {"accuracy_by_level"})
    assert not (tmp_path / "accuracy_by_level.png").exists()
    assert "accuracy_by_level" not in paths["report"].read_text()
    for name in ALL_PLOTS - {"accuracy_by_level"}:
        _png_size((tmp_path / f"{name}.png").read_bytes())


def test_levels_on_excluded_rows_only_give_no_level_plot(tmp_path):
    rows = [{**r, "level": None} for r in sample_rows()]
    rows[3]["level"] = "Level 5"  # the excluded question: not scored, so no accuracy by level
    paths = write_report(tmp_path, _metrics(rows), sample_predictions(rows))
    assert "accuracy_by_level" not in paths


def test_report_without_retrieval_or_steps_still_has_every_plot(tmp_path):
    rows = [{**r, "retrieval_calls": None, "steps_json": None} for r in sample_rows()]
    paths = write_report(tmp_path, _metrics(rows), sample_predictions(rows))
    assert set(paths) == {"report"} | ALL_PLOTS
    _png_size(paths["retrieval_calls"].read_bytes())
    _png_size(paths["error_kinds"].read_bytes())


@pytest.mark.parametrize(
    ("steps_json", "message"),
    [("[{", "steps_json is not valid JSON"), ('[{"step": 1}]', "list of step objects with an 'error_kind'")],
)
def test_bad_steps_json_names_the_question(tmp_path, steps_json, message):
    rows = sample_rows()
    rows[6]["steps_json"] = steps_json
    with pytest.raises(PredictionsError, match=message) as info:
        write_report(tmp_path, _metrics(), sample_predictions(rows))
    assert "predictions row 6 (question 'f1', dataset 'facts')" in str(info.value)
    assert not (tmp_path / "report.md").exists()


def test_empty_or_duplicated_inputs_are_refused(tmp_path):
    metrics = _metrics()
    with pytest.raises(ValueError, match="no metrics rows"):
        write_report(tmp_path, metrics.slice(0, 0), sample_predictions())
    with pytest.raises(ValueError, match="predictions table is empty"):
        write_report(tmp_path, metrics, sample_predictions().slice(0, 0))
    with pytest.raises(ValueError, match="two rows for"):
        table2_markdown(pa.concat_tables([metrics, metrics]))
