"""The on-policy distillation rows of the study from an artifact home: one line per ``opd`` iteration (its
student's accuracy on the training questions it sampled, the teacher tokens scored, the mean reverse KL of
the sampling student to the teacher, the update's steps and seconds) as ``opd.csv``, and the KL per
iteration and segment (thought, code, final answer) as ``opd_kl.png``.

    python results/cpu-study/opd_table.py --home /path/to/home --out results/cpu-study

The numbers are ``distillery query`` views: ``opd_episodes``, ``token_kl`` and ``artifacts``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from storage.catalog import query

ITERATIONS = """
select a.id, (a.config::json ->> 'iteration')::int as iteration, a.metrics,
       (select count(distinct (t.dataset, t.question_id, t.sample_index)) from opd_tokens t
        where t.artifact_id = a.id) as episodes_scored
from artifacts a where a.stage = 'opd' and a.state = 'complete' order by iteration
"""
KL = """
select iteration, segment, sum(tokens) as tokens, sum(kl * tokens) / sum(tokens) as kl
from token_kl group by all order by iteration, segment
"""
COLUMNS = ("iteration", "artifact", "start_adapter", "episodes", "accuracy", "episodes_scored",
           "teacher_tokens_scored", "kl_start", "steps", "update_s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    rows = []
    for artifact, iteration, metrics, scored in query(args.home, ITERATIONS)[1]:
        m = json.loads(metrics) | {"episodes_scored": scored}  # counted here: iterations made before it was a metric
        rows.append({"iteration": iteration, "artifact": artifact, **{k: m.get(k) for k in COLUMNS[2:]}})
    with (args.out / "opd.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot_kl(query(args.home, KL)[1], args.out / "opd_kl.png")
    print(f"{len(rows)} iteration(s) -> {args.out / 'opd.csv'}, {args.out / 'opd_kl.png'}")
    return 0


def plot_kl(rows: list[tuple], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5), layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for segment in sorted({r[1] for r in rows}):
        points = [(r[0], r[3]) for r in rows if r[1] == segment]
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=segment)
    axes.set_xticks(sorted({r[0] for r in rows}))
    axes.set_xlabel("OPD iteration (episodes sampled by the adapter before the update)")
    axes.set_ylabel("reverse KL to the teacher (nats/token)")
    axes.set_title("the student's tokens, scored by the 1.5B teacher")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
