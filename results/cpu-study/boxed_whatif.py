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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent_runtime.parsing import last_boxed
from evaluation.grading import grade
from questions.datasets import ALIASES_KEY
from storage.catalog import query

METHODS = ("agent", "agent-distilled", "teacher-agent")
KINDS = {"arith": "math", "gsm-hard": "math", "facts": "qa", "bamboogle": "qa"}
SQL = """
select method, dataset, question_id, gold, prediction, error, metadata_json, steps_json
from predictions where method in {methods} and not excluded order by method, dataset, question_id
"""
COLUMNS = ("method", "dataset", "n", "accuracy", "accuracy_boxed_ends", "episodes_ended_by_box")


def boxed_answer(steps: list[dict]) -> str | None:
    """The answer of the first action without code that gives a ``\\boxed{}`` answer, if any."""
    for step in steps:
        if step.get("code") is None and step.get("error_kind") == "parse":
            answer = last_boxed(step.get("thought") or "")
            if answer:
                return answer
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    _, rows = query(args.home, SQL.format(methods=METHODS))
    tally: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for method, dataset, _question_id, gold, prediction, error, metadata_json, steps_json in rows:
        metadata = json.loads(metadata_json or "{}")
        gold = metadata.get(ALIASES_KEY) or gold
        kind = KINDS[dataset]
        ran = grade(prediction, gold, kind, error=error)
        answer = boxed_answer(json.loads(steps_json or "[]"))
        ended = answer is not None
        whatif = grade(answer, gold, kind) if ended else ran
        counts = tally[method, dataset]
        counts[0] += 1
        counts[1] += ran.correct
        counts[2] += whatif.correct
        counts[3] += ended
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
