"""Re-grade a stored evaluation with the current grader, into a new ``evals`` artifact.

An evaluation artifact keeps every prediction with its gold answer and episode error, so a grader fix
can be applied to an older evaluation without running a model again: ``distillery regrade EVAL_ID``
recomputes ``correct``, ``score``, ``grade_method``, EM and F1 of each stored prediction with
:func:`evaluation.grading.grade`, and writes the predictions, metrics, report and plots into a new
artifact whose parent is the source. The source is left as it is, so both can be compared::

    distillery regrade 3f2a9c
    distillery query "select artifact_id, method, dataset, accuracy, grader_version from metrics"

The new artifact's id hashes the source id, the grader version and the code, so re-grading again with
the same code finds the first result instead of writing a second one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

from evaluation.grading import GRADER_VERSION, grade
from questions.datasets import ALIASES_KEY
from storage.catalog import read_table
from storage.schemas import METRICS, PREDICTIONS, conform
from storage.store import ArtifactError, ArtifactRef, ArtifactStore

STAGE = "evaluate"


@dataclass(frozen=True)
class Regraded:
    """A re-graded evaluation and what changed against its source."""

    ref: ArtifactRef
    source: ArtifactRef
    predictions: int
    changed: int  # predictions whose verdict (correct) differs from the source's
    cached: bool  # the artifact existed already (same source, grader and code)


def regrade_predictions(predictions: pa.Table, kinds: dict[str, str], artifact_id: str) -> pa.Table:
    """``predictions`` with ``correct``, ``score``, ``grade_method``, ``em`` and ``f1`` recomputed.

    ``kinds`` maps each dataset to its grader family ("math" or "qa"); ``artifact_id`` becomes the rows'
    artifact id. Each row is graded as the evaluation graded it: its prediction against its gold (the
    alias list when the question had one), never correct when the episode recorded an error. The
    normalised strings and EM/F1 in ``metadata_json`` are updated where the row records them.
    """
    rows = conform(predictions, PREDICTIONS).to_pylist()
    for index, row in enumerate(rows):
        if row["dataset"] not in kinds:
            raise ArtifactError(f"predictions row {index} (question {row['question_id']!r}): dataset "
                                f"{row['dataset']!r} is not among the evaluation's datasets {sorted(kinds)}")
        metadata = json.loads(row["metadata_json"]) if row["metadata_json"] else {}
        gold = metadata[ALIASES_KEY] if metadata.get(ALIASES_KEY) else row["gold"]
        verdict = grade(row["prediction"], gold, kinds[row["dataset"]], error=row["error"])
        row.update(artifact_id=artifact_id, correct=verdict.correct, score=verdict.score,
                   grade_method=verdict.method, excluded=verdict.excluded, em=verdict.em, f1=verdict.f1)
        recorded = {"pred_norm": verdict.pred_norm, "gold_norm": verdict.gold_norm, "em": verdict.em,
                    "f1": verdict.f1}
        if any(key in metadata for key in recorded):
            metadata.update({key: value for key, value in recorded.items() if key in metadata})
            row["metadata_json"] = json.dumps(metadata, ensure_ascii=False, default=str)
    return pa.Table.from_pylist(rows, schema=PREDICTIONS)


def dataset_kinds(manifest: dict) -> dict[str, str]:
    """The grader family of each dataset of an evaluation, from its manifest's config."""
    try:
        datasets = manifest["config"]["evaluate"]["datasets"]
        return {d["name"]: d["kind"] for d in datasets}
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"artifact {manifest['id']}: its config names no evaluation datasets "
                            f"(missing {exc}); is it an evaluation?") from exc


def regrade_evaluation(store: ArtifactStore, source_id: str) -> Regraded:
    """Re-grade the evaluation ``source_id`` (a unique id prefix is enough) into a new artifact."""
    from evaluation.metrics import compute_metrics
    from evaluation.report import write_report

    source = store.resolve(source_id)
    if source.stage != STAGE:
        raise ArtifactError(f"artifact {source.id} is from stage {source.stage!r}; regrade takes an evaluation "
                            f"({STAGE!r})")
    manifest = store.manifest(source)
    kinds = dataset_kinds(manifest)
    identity = {"regrade_of": source.id, "grader_version": GRADER_VERSION,
                "evaluate": manifest["config"]["evaluate"]}
    plan = store.plan_stage(STAGE, identity, [source.id])
    with store.lock(plan.ref):  # one writer per artifact: a concurrent re-grade waits, then reuses it
        if store.exists(plan.ref):
            done = store.manifest(plan.ref)
            return Regraded(plan.ref, source, done["row_counts"]["predictions"], done["metrics"]["changed_verdicts"],
                            cached=True)
        old = read_table(source.path, "predictions")
        new = regrade_predictions(old, kinds, plan.ref.id)
        changed = sum(1 for a, b in zip(old.column("correct").to_pylist(), new.column("correct").to_pylist())
                      if a != b)
        artifact = store.open(plan)
        artifact.write_table("predictions", new, PREDICTIONS, part=0)
        metrics = compute_metrics(new, plan.ref.id)
        artifact.write_table("metrics", metrics, METRICS)
        paths = write_report(artifact.path, metrics, new, title=f"distillery evaluation {source.id}, re-graded")
        artifact.finish(
            {"predictions": new.num_rows, "metrics": metrics.num_rows},
            {"report": str(paths["report"]), "table": metrics.to_pylist(), "grader_version": GRADER_VERSION,
             "changed_verdicts": changed,
             # Evaluations written before grader versions were recorded have none in their manifest.
             "regraded_from": {"id": source.id, "grader_version": manifest["metrics"].get("grader_version")}},
        )
    return Regraded(plan.ref, source, new.num_rows, changed, cached=False)
