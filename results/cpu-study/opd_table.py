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
select a.id, (a.config::json ->> 'iteration')::int as iteration,
       coalesce(a.config::json -> 'opd' ->> 'baseline', 'none') as baseline, a.metrics,
       (select count(distinct (t.dataset, t.question_id, t.sample_index)) from opd_tokens t
        where t.artifact_id = a.id) as episodes_scored
from artifacts a where a.stage = 'opd' and a.state = 'complete' order by a.created, iteration
"""
KL = """
select artifact_id, iteration, segment, sum(tokens) as tokens, sum(kl * tokens) / sum(tokens) as kl
from token_kl group by all order by artifact_id, iteration, segment
"""
COLUMNS = ("iteration", "artifact", "baseline", "start_adapter", "episodes", "accuracy", "episodes_scored",
           "teacher_tokens_scored", "kl_start", "steps", "update_s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    rows = []
    for artifact, iteration, baseline, metrics, scored in query(args.home, ITERATIONS)[1]:
        m = json.loads(metrics) | {"episodes_scored": scored}  # counted here: iterations made before it was a metric
        rows.append({"iteration": iteration, "artifact": artifact, "baseline": baseline,
                     **{k: m.get(k) for k in COLUMNS[3:]}})
    with (args.out / "opd.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot_kl(query(args.home, KL)[1], {r["artifact"]: r for r in rows}, args.out / "opd_kl.png")
    print(f"{len(rows)} iteration(s) -> {args.out / 'opd.csv'}, {args.out / 'opd_kl.png'}")
    return 0


def plot_kl(rows: list[tuple], runs: dict[str, dict], path: Path) -> None:
    """The KL at the start of each iteration (the sampling adapter's tokens) per segment, a bar per opd
    artifact: runs and iterations side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 3.5), layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    segments = sorted({r[2] for r in rows})
    artifacts = [a for a in runs if any(r[0] == a for r in rows)]
    width = 0.8 / max(1, len(artifacts))
    for i, artifact in enumerate(artifacts):
        kl = {r[2]: r[4] for r in rows if r[0] == artifact}
        run = runs[artifact]
        axes.bar([j + (i - (len(artifacts) - 1) / 2) * width for j in range(len(segments))],
                 [kl.get(s, 0.0) for s in segments], width=width,
                 label=f"opd/{run['iteration']} {artifact[:8]} (baseline {run['baseline']}, "
                       f"{run['episodes_scored']} episodes scored)")
    axes.set_xticks(range(len(segments)), segments)
    axes.set_ylabel("reverse KL to the teacher (nats/token)")
    axes.set_title("the sampling student's tokens, scored by the 1.5B teacher")
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3, axis="y")
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
