"""Summarise the study's teacher stages from an artifact home: per-dataset accuracy of the teacher's CoT
(the prefixes artifact) and of its agent (the trajectories artifact), the paper's filter's yield, and a plot.

    python results/cpu-study/teacher_stage.py --home /path/to/home --out results/cpu-study

Writes ``teacher_stage.csv`` and ``teacher_stage.png``; the numbers come from ``distillery query`` views.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from storage.catalog import query

SQL = """
with cot as (select dataset, count(*) as n, sum(correct::int) as correct from cot_solutions group by all),
agent as (select dataset, count(*) as n, sum(correct::int) as correct, avg(num_steps) as steps
          from episodes group by all),
parse as (select dataset, avg((error_kind = 'parse')::int) as parse_rate from steps group by all)
select agent.dataset, agent.n, cot.correct as cot_correct, agent.correct as agent_correct,
       round(100.0 * cot.correct / cot.n, 1) as cot_accuracy, round(100.0 * agent.correct / agent.n, 1) as agent_accuracy,
       round(agent.steps, 2) as mean_steps, round(parse.parse_rate, 3) as parse_error_rate
from agent join cot using (dataset) join parse using (dataset) order by dataset
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    columns, rows = query(args.home, SQL)
    with (args.out / "teacher_stage.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [r[0] for r in rows]
    x = range(len(datasets))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([i - 0.2 for i in x], [r[4] for r in rows], width=0.4, label="teacher CoT (256 tokens)")
    ax.bar([i + 0.2 for i in x], [r[5] for r in rows], width=0.4, label="teacher agent (FTP, 3 steps)")
    ax.set_xticks(list(x), [f"{d}\n(n={r[1]})" for d, r in zip(datasets, rows)])
    ax.set_ylabel("accuracy, %")
    ax.set_title("Qwen2.5-Coder-1.5B teacher on the training questions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "teacher_stage.png", dpi=120)
    for row in rows:
        print(dict(zip(columns, row)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
