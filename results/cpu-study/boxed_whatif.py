"""What the study's agent rows would score had a prose ``\\boxed{}`` answer ended the episode.

The study ran with ``evaluate.agent.boxed_answer`` off (the frozen commit had no such switch; the
project's default is now on). An agent action without code that gives its answer as ``\\boxed{...}`` in
prose was a parse error: the observation asked for code, and the episode went on. With the switch on, the
engine ends the episode at that action with that answer. Greedy decoding makes every step before it the
same, so the outcome can be read off the stored trajectories without running a model: the answer of the
first codeless action with a box, graded by the project's grader; episodes without one keep their answer.

Rows with sampled actions (SAG) are left out: which candidate wins a vote would change too.
Both columns are graded here by the current grader, so they compare like with like.

    python results/cpu-study/boxed_whatif.py --home /path/to/home --out results/cpu-study
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent_runtime.parsing import last_boxed
from evaluation.regrade import dataset_kinds, regrade_predictions
from storage.catalog import read_table
from storage.store import ArtifactStore

METHODS = ("agent", "agent-distilled", "teacher-agent")
COLUMNS = ("method", "dataset", "n", "accuracy", "accuracy_boxed_ends", "episodes_ended_by_box")


def boxed_answer(steps: list[dict]) -> str | None:
    """The answer of the first action without code that gives a ``\\boxed{}`` answer, if any."""
    for step in steps:
        if step.get("code") is None and step.get("error_kind") == "parse":
            answer = last_boxed(step.get("thought") or "")
            if answer:
                return answer
    return None


def ended_at_box(predictions: pa.Table) -> tuple[pa.Table, list[bool]]:
    """``predictions`` as they would be had a boxed prose answer ended each episode, and which it ended."""
    answers = [boxed_answer(json.loads(s or "[]")) for s in predictions.column("steps_json").to_pylist()]
    ended = [a is not None for a in answers]
    prediction = [
        a if e else p for a, e, p in zip(answers, ended, predictions.column("prediction").to_pylist())
    ]
    error = [None if e else x for e, x in zip(ended, predictions.column("error").to_pylist())]
    table = predictions.set_column(
        predictions.schema.get_field_index("prediction"), "prediction", pa.array(prediction, pa.string())
    )
    table = table.set_column(table.schema.get_field_index("error"), "error", pa.array(error, pa.string()))
    return table, ended


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    store = ArtifactStore(args.home)
    tally: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for manifest in store.list("evaluate"):
        ref = store.ref("evaluate", manifest["id"])
        predictions = read_table(ref.path, "predictions")
        predictions = predictions.filter(pc.is_in(predictions.column("method"), pa.array(METHODS)))
        if not predictions.num_rows:
            continue
        # Both verdicts as the evaluation grades (its datasets' kinds, alias lists, errors), by this grader.
        kinds = dataset_kinds(manifest)
        whatif, ended = ended_at_box(predictions)
        ran = regrade_predictions(predictions, kinds, ref.id).to_pylist()
        boxed = regrade_predictions(whatif, kinds, ref.id).to_pylist()
        for row, row_boxed, by_box in zip(ran, boxed, ended):
            if row["excluded"]:
                continue
            counts = tally[row["method"], row["dataset"]]
            counts[0] += 1
            counts[1] += row["correct"]
            counts[2] += row_boxed["correct"]
            counts[3] += by_box
    table = [
        (method, dataset, n, round(100 * ok / n, 1), round(100 * ok_boxed / n, 1), ended)
        for (method, dataset), (n, ok, ok_boxed, ended) in sorted(tally.items())
    ]
    with (args.out / "boxed_whatif.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(table)
    print(f"| {' | '.join(COLUMNS)} |\n|---|---|---:|---:|---:|---:|")
    for row in table:
        print(f"| {' | '.join(str(v) for v in row)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
