"""`distillery regrade`: an evaluation scored by the old grader, re-scored into a new artifact by the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pytest

from evaluation.evaluate import EvalConfig
from evaluation.grading import GRADER_VERSION
from evaluation.metrics import compute_metrics
from flows.cli import main
from questions.datasets import DatasetConfig
from storage.catalog import read_table
from storage.schemas import METRICS, PREDICTIONS
from storage.store import ArtifactStore

EVAL_CONFIG = EvalConfig(datasets=(
    DatasetConfig(name="gsm-hard", source="gsm_hard.json", kind="math"),
    DatasetConfig(name="facts", source="builtin:facts", kind="qa"),
))

# (dataset, question id, gold, prediction, correct as the version-1 grader stored it, grade method, error,
# aliases). The first two are the near misses of issue 14 that its relative tolerance accepted.
OLD_VERDICTS = [
    ("gsm-hard", "g1", "13138980.0", "13138981", True, "numeric", None, None),
    ("gsm-hard", "g2", "963739.5", "963739", True, "numeric", None, None),
    ("gsm-hard", "g3", "33.333333333333336", "33.33", True, "numeric", None, None),
    ("gsm-hard", "g4", "\\frac{14}{3}", "14/3", True, "math_verify", None, None),
    ("gsm-hard", "g5", "7.0", "7", False, "error", "SandboxTimeout: step 3", None),
    ("facts", "f1", "Paris", "Paris, France", True, "cover_em", None, None),
    ("facts", "f2", "New York City", "NYC", True, "cover_em", None, ["New York City", "NYC"]),
    ("facts", "f3", None, "Rome", False, "no_gold", None, None),
]


def prediction_rows(artifact_id: str) -> list[dict]:
    rows = []
    for dataset, qid, gold, prediction, correct, method, error, aliases in OLD_VERDICTS:
        metadata = {"answer_aliases": aliases} if aliases else {}
        rows.append({
            "artifact_id": artifact_id, "dataset": dataset, "question_id": qid, "sample_index": 0,
            "model": "scripted", "method": "cot", "question": f"question {qid}?", "gold": gold,
            "prediction": prediction, "correct": correct, "score": float(correct), "grade_method": method,
            "excluded": gold is None, "num_steps": 0, "prompt_tokens": 10, "completion_tokens": 5,
            "error": error, "metadata_json": json.dumps(metadata), "steps_json": "[]",
        })
    return rows


@pytest.fixture
def old_evaluation(home) -> tuple[ArtifactStore, str]:
    """An evaluation artifact as the version-1 grader wrote it (no grader version in metrics or manifest)."""
    store = ArtifactStore(home)
    identity = {"evaluate": EVAL_CONFIG.model_dump(mode="json")}
    artifact = store.begin("evaluate", identity, ["0123456789abcdef"])
    predictions = pa.Table.from_pylist(prediction_rows(artifact.ref.id), schema=PREDICTIONS)
    artifact.write_table("predictions", predictions, PREDICTIONS, part=0)
    metrics = compute_metrics(predictions, artifact.ref.id)
    metrics = metrics.set_column(METRICS.get_field_index("grader_version"), "grader_version",
                                 pa.nulls(metrics.num_rows, pa.string()))
    artifact.write_table("metrics", metrics, METRICS)
    artifact.finish({"predictions": predictions.num_rows, "metrics": metrics.num_rows},
                    {"table": metrics.to_pylist()})
    return store, artifact.ref.id


def test_regrade_rescores_into_a_new_artifact_and_keeps_the_source(old_evaluation, home):
    store, source_id = old_evaluation
    source_files = {p.name: p.read_bytes() for p in store.resolve(source_id).path.rglob("*") if p.is_file()}

    result = subprocess.run([sys.executable, "-m", "flows.cli", "--home", str(home), "regrade", source_id[:8]],
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (f"re-graded 8 predictions of evaluate/{source_id} with grader version {GRADER_VERSION}: "
            "2 verdicts changed (artifact written)") in result.stdout
    assert "warning" not in result.stderr.lower() and "Timeout is disabled" not in result.stderr

    (new,) = [m for m in store.list("evaluate") if m["id"] != source_id]
    assert new["parents"] == [source_id]
    assert new["config"]["regrade_of"] == source_id and new["config"]["grader_version"] == GRADER_VERSION
    assert new["metrics"]["grader_version"] == GRADER_VERSION and new["metrics"]["changed_verdicts"] == 2
    assert new["metrics"]["regraded_from"] == {"id": source_id, "grader_version": None}
    assert new["row_counts"] == {"predictions": 8, "metrics": 2}

    path = store.resolve(new["id"]).path
    rows = {r["question_id"]: r for r in read_table(path, "predictions").to_pylist()}
    assert {q: (r["correct"], r["grade_method"]) for q, r in rows.items()} == {
        "g1": (False, "numeric"), "g2": (False, "numeric"), "g3": (True, "numeric"), "g4": (True, "math_verify"),
        "g5": (False, "error"), "f1": (True, "cover_em"), "f2": (True, "cover_em"), "f3": (False, "no_gold"),
    }
    assert {r["artifact_id"] for r in rows.values()} == {new["id"]}
    assert (rows["f1"]["em"], rows["f2"]["em"]) == (0.0, 1.0)  # f2 matched its alias "NYC"

    metrics = {r["dataset"]: r for r in read_table(path, "metrics").to_pylist()}
    assert (metrics["gsm-hard"]["n"], metrics["gsm-hard"]["accuracy"]) == (5, 0.4)  # was 0.8
    assert (metrics["facts"]["n"], metrics["facts"]["accuracy"]) == (2, 1.0)
    assert {r["grader_version"] for r in metrics.values()} == {GRADER_VERSION}
    assert {r["grade_timeouts"] for r in metrics.values()} == {0}
    report = (path / "report.md").read_text()
    assert report.startswith(f"# distillery evaluation {source_id}, re-graded\n")
    assert f"Graded with grader version `{GRADER_VERSION}`" in report

    # The source is untouched, and re-grading again with the same code finds the same artifact.
    assert {p.name: p.read_bytes() for p in store.resolve(source_id).path.rglob("*") if p.is_file()} == source_files
    assert main(["--home", str(home), "regrade", source_id]) == 0
    assert len(store.list("evaluate")) == 2


def test_regrade_of_a_missing_or_non_evaluation_artifact_is_one_line_and_exit_2(old_evaluation, home, capsys):
    store, _ = old_evaluation
    index = store.begin("index", {"corpus": "none"})
    index.finish()
    assert main(["--home", str(home), "regrade", "deadbeef"]) == 2
    assert "no complete artifact with id 'deadbeef'" in capsys.readouterr().err
    assert main(["--home", str(home), "regrade", index.ref.id]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is from stage 'index'; regrade takes an evaluation ('evaluate')" in err
    assert len(store.list("evaluate")) == 1
