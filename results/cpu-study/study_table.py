"""The study's results table from an artifact home: every evaluation artifact's metrics (one per method,
made with ``distillery evaluate --methods NAME``), written as ``metrics.csv``, a Markdown table beside the
paper's Qwen2.5-0.5B rows (``table.md``) and a plot (``accuracy.png``). Rows run on the first N questions of
each set only (the teacher's, SAG) are also compared with their baseline on the same questions
(``paired.csv`` and a second table in ``table.md``).

    python results/cpu-study/study_table.py --home /path/to/home --out results/cpu-study

Accuracy is in points (0-100). The numbers are read with ``distillery query`` views, so
``distillery --home HOME query "select method, dataset, n, accuracy from metrics"`` shows the same.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from storage.catalog import query

ROWS = (
    "cot",
    "agent",
    "cot-distilled",
    "cot-distilled+rag",
    "agent-distilled",
    "agent-distilled+sag",
    "agent-opd",
    "agent-opd+sag",
    "teacher-cot",
    "teacher-agent",
)
COLUMNS = ("arith", "facts", "gsm-hard", "bamboogle")
# Kang et al. (NeurIPS 2025), Table 2, Qwen2.5-0.5B-Instruct student, average over the eight benchmarks,
# and its GSM-Hard column (the only held-out column the study shares with the paper's table).
PAPER = {
    "cot": (11.1, 25.6),
    "agent": (1.8, None),
    "cot-distilled": (13.6, None),
    "agent-distilled": (19.2, None),
    "agent-distilled+sag": (21.9, 40.8),
}
# Evaluations made again with a corrected recipe: their exports stay committed (a record), their rows leave the
# table (id -> why; the report says more).
SUPERSEDED: dict[str, str] = {}
SQL = """
select m.method, m.model, m.dataset, m.n, round(100 * m.accuracy, 1) as accuracy, m.parse_error_rate,
       m.mean_steps, m.tokens_per_question, m.artifact_id
from metrics m join artifacts a on a.id = m.artifact_id and a.stage = 'evaluate'
where m.artifact_id not in ({superseded})
order by m.method, m.dataset
"""
# (row, baseline): a row evaluated on fewer questions is compared with its baseline on the questions both have.
PAIRS = (
    ("agent-distilled+sag", "agent-distilled"),
    ("agent-opd", "agent-distilled"),
    ("agent-opd+sag", "agent-distilled+sag"),
    ("teacher-agent", "agent-distilled"),
    ("teacher-cot", "cot"),
    ("teacher-cot", "agent-distilled"),
)
PAIRED_COLUMNS = ("method", "baseline", "dataset", "n", "accuracy", "baseline_accuracy")
PAIRED_SQL = """
select a.method, b.method as baseline, a.dataset, count(*) as n,
       round(100 * avg(a.correct::int), 1) as accuracy, round(100 * avg(b.correct::int), 1) as baseline_accuracy
from predictions a join predictions b on a.dataset = b.dataset and a.question_id = b.question_id
where a.method = '{row}' and b.method = '{baseline}' and not a.excluded and not b.excluded
  and a.artifact_id not in ({superseded}) and b.artifact_id not in ({superseded})
group by all order by a.dataset
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    superseded = ", ".join(f"'{i}'" for i in SUPERSEDED) or "''"
    columns, rows = query(args.home, SQL.format(superseded=superseded))
    seen = [r[0] for r in rows]
    if len(seen) != len({(r[0], r[2]) for r in rows}):
        raise SystemExit(f"{args.home}: a method was evaluated by more than one artifact; keep one")
    with (args.out / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    cells = {(r[0], r[2]): (r[4], r[3]) for r in rows}
    table = markdown(cells)
    paired = [
        r
        for row, base in PAIRS
        if row in seen and base in seen
        for r in query(args.home, PAIRED_SQL.format(row=row, baseline=base, superseded=superseded))[1]
    ]
    with (args.out / "paired.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PAIRED_COLUMNS)
        writer.writerows(paired)
    if paired:
        table += (
            "\nOn the same questions (rows run on the first questions of each set only):\n\n"
            f"| {' | '.join(PAIRED_COLUMNS)} |\n|---|---|---|---:|---:|---:|\n"
            + "".join(f"| {' | '.join(str(v) for v in r)} |\n" for r in paired_with_averages(paired))
        )
    for artifact, why in SUPERSEDED.items():
        table += f"\nNot in the table: evals `{artifact}`, {why}.\n"
    (args.out / "table.md").write_text(table)
    print(table)
    plot(cells, args.out / "accuracy.png")
    return 0


def paired_with_averages(paired: list) -> list:
    """The paired rows, each (row, baseline) followed by its mean over the held-out columns once it has all."""
    out = []
    for key in dict.fromkeys((r[0], r[1]) for r in paired):
        group = [r for r in paired if (r[0], r[1]) == key]
        out += group
        means = [column_mean({r[2]: r[i] for r in group}) for i in (4, 5)]
        if None not in means:
            out.append((*key, "**average**", sum(r[3] for r in group), *(f"**{m:.1f}**" for m in means)))
    return out


def column_mean(by_column: dict) -> float | None:
    """The mean of one value per held-out column, or None while a column is missing."""
    values = [by_column[c] for c in COLUMNS if c in by_column]
    return round(sum(values) / len(values), 1) if len(values) == len(COLUMNS) else None


def average(cells: dict, method: str) -> float | None:
    """A method's mean accuracy over the held-out columns, or None while a column is missing."""
    return column_mean({c: acc for (m, c), (acc, _) in cells.items() if m == method})


def markdown(cells: dict) -> str:
    head = (
        "| method | "
        + " | ".join(f"{c}" for c in COLUMNS)
        + " | average | paper avg (0.5B) | paper GSM-Hard |"
    )
    lines = [head, "|---|" + "---:|" * (len(COLUMNS) + 3)]
    for method in (m for m in ROWS if any((m, c) in cells for c in COLUMNS)):  # rows not made yet are left out
        row = [
            f"{cells[(method, c)][0]:.1f} (n={cells[(method, c)][1]})" if (method, c) in cells else "—"
            for c in COLUMNS
        ]
        mean = average(cells, method)
        paper = PAPER.get(method, (None, None))
        lines.append(
            f"| {method} | "
            + " | ".join(row)
            + f" | {'—' if mean is None else f'{mean:.1f}'} | "
            + " | ".join("—" if p is None else f"{p:.1f}" for p in paper)
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(cells: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in ROWS if any((m, c) in cells for c in COLUMNS)]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    full: dict[str, int] = {}  # the largest n evaluated per column: a whole set
    for (_, column), (_, n) in cells.items():
        full[column] = max(full.get(column, 0), n)
    for i, method in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(COLUMNS))]
        sizes = {c: cells[(method, c)][1] for c in COLUMNS if (method, c) in cells}
        subset = any(n < full[c] for c, n in sizes.items())
        # a row run on the first questions of each set only is hatched and says so: not the same questions
        ax.bar(
            xs,
            [cells.get((method, c), (0, 0))[0] for c in COLUMNS],
            width=width,
            hatch="//" if subset else None,
            label=f"{method} (first {min(sizes.values())} per set)" if subset else method,
        )
    ax.set_xticks(range(len(COLUMNS)), COLUMNS)
    ax.set_ylabel("accuracy, %")
    ax.set_title("Qwen2.5-Coder-1.5B agent distilled into Qwen2.5-Coder-0.5B (held-out sets)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
