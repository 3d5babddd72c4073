"""The evaluation report: a Table-2-shaped markdown table, a detail table and PNG plots.

``write_report(out_dir, metrics, predictions)`` writes into an evaluation artifact folder:

- ``report.md``: the title, which grader version scored the predictions (and how many answers hit
  the symbolic grading time limit), the Table-2 table (rows = model · method, columns = datasets +
  Average, accuracy in %), a per-dataset detail table and the plots as relative image links;
- ``accuracy_by_dataset.png``: grouped bars, one bar per model · method row in every dataset;
- ``accuracy_by_level.png``: accuracy per difficulty level, only for datasets whose predictions carry a
  ``level`` (MATH's levels 1–5);
- ``error_kinds.png``: share of steps with parse / execution / timeout / other errors per row, rows
  without SAG and with SAG in separate panels;
- ``retrieval_calls.png``: distribution of retrieval calls per episode per row.

Pure apart from writing those files (atomically). The evaluation task publishes ``report.md`` and the
metrics rows as Prefect artifacts; this module does not import Prefect. Plots are drawn on
``matplotlib.figure.Figure`` objects, which render through the Agg canvas without pyplot, so no global
backend or figure registry is touched (Prefect runs tasks in threads).
"""

from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from pathlib import Path, PurePath

import pyarrow as pa

from common.files import atomic_write_bytes
from evaluation.metrics import PredictionsError, group_sort_key, prediction_records
from storage.schemas import METRICS, conform

DPI = 120
MISSING = "–"  # an en dash: a cell with no value
NO_ADAPTER = "-"
ERROR_KINDS = ("parse", "execution", "timeout", "other")
ERROR_LABELS = {"parse": "parse", "execution": "execution", "timeout": "timeout",
                "other": "other (memory, forbidden import, crash)"}
ERROR_COLORS = {"parse": "#d62728", "execution": "#ff7f0e", "timeout": "#9467bd", "other": "#7f7f7f"}
RETRIEVAL_CAP = 8  # episodes with more calls share the last bar ("8+"), so one outlier keeps the axis short
PLOT_TITLES = {
    "accuracy_by_dataset": "Accuracy by dataset",
    "accuracy_by_level": "Accuracy by level",
    "error_kinds": "Error kinds, with and without SAG",
    "retrieval_calls": "Retrieval calls per episode",
}

TABLE2_NOTE = (
    "Cells are accuracy × 100 over questions with a gold answer; Average is the unweighted mean over the "
    "datasets a row has; `[id]` is the LoRA adapter."
)
DETAIL_NOTE = (
    "n counts scored questions, Excluded those without a gold answer. Steps, retrieval calls and tokens are "
    "means per episode and error rates are shares of steps, over all episodes (excluded included)."
)

RowKey = tuple[str, "str | None", str]  # (model, adapter, method)


# ----------------------------------------------------------------------------------------------- labels


def adapter_short_id(adapter: str) -> str:
    """The first 8 characters of an adapter's id (or of the last component of an adapter path)."""
    return PurePath(adapter).name[:8] or adapter


def row_label(model: str, adapter: str | None, method: str) -> str:
    """``model · method``, or ``model [adapter id] · method`` for a model with a LoRA adapter."""
    if adapter is None:
        return f"{model} · {method}"
    return f"{model} [{adapter_short_id(adapter)}] · {method}"


def is_sag(method: str) -> bool:
    """Methods using self-consistent action generation carry "sag" in their name."""
    return "sag" in method.lower()


# ------------------------------------------------------------------------------------------------ tables


def table2_markdown(metrics: pa.Table) -> str:
    """The paper's Table 2: rows = model · method, columns = datasets (sorted) + Average.

    Cells are accuracy × 100 with one decimal, ``–`` where a row has no accuracy for a dataset.
    Average is the unweighted mean of the row's accuracies over the datasets it has.
    """
    records = _metric_records(metrics)
    datasets = sorted({r["dataset"] for r in records})
    lines = [
        "| Model · method | " + " | ".join(_escape(d) for d in datasets) + " | Average |",
        "|---|" + "---:|" * (len(datasets) + 1),
    ]
    for key, by_dataset in _accuracy_rows(records).items():
        values = [by_dataset.get(d) for d in datasets]
        cells = [_pct(v) for v in values] + [_pct(_mean_present(values))]
        lines.append(f"| {_escape(row_label(*key))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def detail_markdown(metrics: pa.Table) -> str:
    """Every metrics row: n, excluded, accuracy/EM/F1 (%), mean steps, retrieval calls, error rates, tokens."""
    header = (
        "| Model | Adapter | Method | Dataset | n | Excluded | Accuracy % | EM % | F1 % | Steps "
        "| Retrieval calls | Parse err % | Exec err % | Tokens/question |"
    )
    lines = [header, "|---|---|---|---|" + "---:|" * 10]
    for r in _metric_records(metrics):
        adapter = NO_ADAPTER if r["adapter"] is None else adapter_short_id(r["adapter"])
        cells = [
            _escape(r["model"]), _escape(adapter), _escape(r["method"]), _escape(r["dataset"]),
            str(r["n"]), str(r["n_excluded"]), _pct(r["accuracy"]), _pct(r["em"]), _pct(r["f1"]),
            _num(r["mean_steps"], 2), _num(r["retrieval_calls"], 2), _pct(r["parse_error_rate"]),
            _pct(r["exec_error_rate"]), _num(r["tokens_per_question"], 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _metric_records(metrics: pa.Table) -> list[dict]:
    """Metrics rows (cast to METRICS) in report order; a repeated group is an error."""
    records = conform(metrics, METRICS).to_pylist()
    records.sort(key=lambda r: group_sort_key(r["model"], r["adapter"], r["method"], r["dataset"]))
    seen: set[tuple] = set()
    for r in records:
        key = (r["model"], r["adapter"], r["method"], r["dataset"])
        if None in (r["model"], r["method"], r["dataset"]):
            raise ValueError(f"metrics row {key}: model, method and dataset must not be null")
        if key in seen:
            raise ValueError(f"metrics hold two rows for {key}; report one evaluation's metrics at a time")
        seen.add(key)
    return records


def _accuracy_rows(records: list[dict]) -> dict[RowKey, dict[str, float | None]]:
    rows: dict[RowKey, dict[str, float | None]] = {}
    for r in records:
        rows.setdefault((r["model"], r["adapter"], r["method"]), {})[r["dataset"]] = r["accuracy"]
    return rows


def _mean_present(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _pct(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.1f}"


def _num(value: float | None, digits: int) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


# ------------------------------------------------------------------------------------------------ report


def write_report(
    out_dir: Path, metrics: pa.Table, predictions: pa.Table, title: str = "distillery evaluation"
) -> dict[str, Path]:
    """Write ``report.md`` and the PNG plots into ``out_dir``; return ``{"report": path, <plot>: path}``.

    ``accuracy_by_level`` is written only when some scored prediction has a non-null ``level`` (a stale
    one from an earlier report in the same folder is removed). Every file is written atomically, plots
    first, so ``report.md`` never links a missing image. Raises ValueError when ``metrics`` or
    ``predictions`` is empty, :class:`~evaluation.metrics.PredictionsError` for malformed predictions
    (e.g. bad ``steps_json``); nothing is written then.
    """
    if metrics.num_rows == 0:
        raise ValueError("no metrics rows to report: the evaluation scored no question")
    out_dir = Path(out_dir)
    metric_rows = _metric_records(metrics)
    episodes = prediction_records(predictions, extra_columns=("level", "steps_json"))
    if not episodes:
        raise ValueError("the predictions table is empty: the plots need the predictions the metrics came from")
    keys = list(_accuracy_rows(metric_rows))
    keys += sorted({_row_key(e) for e in episodes} - set(keys), key=lambda k: group_sort_key(*k))
    colors = _palette(keys)
    error_counts = _step_error_counts(episodes)  # parses steps_json: bad input fails before any drawing
    plots = {
        "accuracy_by_dataset": _plot_accuracy_by_dataset(metric_rows, colors),
        "accuracy_by_level": _plot_accuracy_by_level(episodes, colors),
        "error_kinds": _plot_error_kinds(error_counts, keys),
        "retrieval_calls": _plot_retrieval_calls(episodes, colors),
    }
    paths: dict[str, Path] = {}
    for name, png in plots.items():
        path = out_dir / f"{name}.png"
        if png is None:
            path.unlink(missing_ok=True)
            continue
        atomic_write_bytes(path, png)
        paths[name] = path
    report = out_dir / "report.md"
    atomic_write_bytes(report, _report_markdown(title, metrics, metric_rows, list(paths)).encode())
    return {"report": report, **paths}


def _report_markdown(title: str, metrics: pa.Table, rows: list[dict], plots: list[str]) -> str:
    ids = sorted({r["artifact_id"] for r in rows if r["artifact_id"] is not None})
    datasets = sorted({r["dataset"] for r in rows})
    parts = [f"# {title}", ""]
    if ids:
        parts += ["Evaluation artifact " + ", ".join(f"`{i}`" for i in ids) + ".", ""]
    parts += [_grader_line(rows), ""]
    parts += [
        "## Accuracy (%)", "",
        f"Datasets: {', '.join(datasets)}. {TABLE2_NOTE}", "",
        table2_markdown(metrics),
        "## Details", "",
        DETAIL_NOTE, "",
        detail_markdown(metrics),
        "## Plots", "",
    ]
    for name in plots:
        parts += [f"![{PLOT_TITLES[name]}]({name}.png)", ""]
    return "\n".join(parts)


def _grader_line(rows: list[dict]) -> str:
    """Which grader scored the predictions; metrics written before grader versions say "unrecorded"."""
    versions = sorted({r["grader_version"] for r in rows if r["grader_version"] is not None})
    named = ", ".join(f"`{v}`" for v in versions) if versions else "unrecorded (before version 2)"
    line = f"Graded with grader version {named} (`evaluation.grading.GRADER_VERSION`)."
    timeouts = sum(r["grade_timeouts"] or 0 for r in rows)
    if timeouts:
        line += f" {timeouts} answer(s) hit the symbolic grading time limit and count as incorrect."
    return line


def _row_key(episode: dict) -> RowKey:
    return (episode["model"], episode["adapter"], episode["method"])


# ------------------------------------------------------------------------------------------------- plots


def _palette(keys: list[RowKey]) -> dict[RowKey, tuple]:
    """One colour per model · method row, the same in every plot."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(keys) <= 10 else "tab20"]
    return {key: cmap(i % cmap.N) for i, key in enumerate(keys)}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _legend_below(fig, axes: list, max_columns: int = 4) -> None:
    """One legend for ``axes`` under the plot, in as many columns as the figure's width fits."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    labels, handles = list(entries), list(entries.values())
    # ~0.065 in per character at font size 8, plus the colour handle and the gap between columns.
    column_in = 0.065 * max(len(label) for label in labels) + 0.7
    fits = int(fig.get_figwidth() // column_in)
    columns = max(1, min(max_columns, len(labels), fits))
    fig.legend(handles, labels, loc="outside lower center", ncols=columns, fontsize=8, frameon=False)


def _plot_accuracy_by_dataset(rows: list[dict], colors: dict[RowKey, tuple]) -> bytes:
    by_row = _accuracy_rows(rows)
    datasets = sorted({r["dataset"] for r in rows})
    columns = datasets + ["Average"]
    width = 0.8 / len(by_row)
    fig = _figure(min(16.0, max(6.0, 1.5 + len(columns) * (0.3 * len(by_row) + 0.6))), 4.8)
    ax = fig.add_subplot()
    for i, (key, by_dataset) in enumerate(by_row.items()):
        values = [by_dataset.get(d) for d in datasets]
        values.append(_mean_present(values))
        heights = [math.nan if v is None else 100 * v for v in values]
        offsets = [c + (i - (len(by_row) - 1) / 2) * width for c in range(len(columns))]
        bars = ax.bar(offsets, heights, width, label=row_label(*key), color=colors[key])
        if len(by_row) * len(columns) <= 32:  # beyond that the numbers overlap; the table has them
            ax.bar_label(bars, labels=[_pct(v) for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylim(0, 108)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy by dataset")
    ax.grid(axis="y", alpha=0.3)
    _legend_below(fig, [ax], max_columns=3)
    return _png(fig)


def _level_name(level: str) -> str:
    """MATH writes levels as "Level 3"; other sources as "3". Both become "3"."""
    match = re.search(r"\d+", level)
    return match.group() if match else level.strip()


def _level_sort_key(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _plot_accuracy_by_level(episodes: list[dict], colors: dict[RowKey, tuple]) -> bytes | None:
    """Accuracy per level for each dataset whose scored predictions carry levels; None when none do."""
    # (dataset, row, level) -> [correct, scored]
    counts: dict[tuple[str, RowKey, str], list[int]] = {}
    for e in episodes:
        if e["excluded"] or e["level"] is None:
            continue
        cell = counts.setdefault((e["dataset"], _row_key(e), _level_name(e["level"])), [0, 0])
        cell[0] += int(e["correct"])
        cell[1] += 1
    if not counts:
        return None
    datasets = sorted({d for d, _, _ in counts})
    keys = [k for k in colors if any(k == key for _, key, _ in counts)]
    fig = _figure(max(6.0, 5.0 * len(datasets)), 4.6)
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets):
        levels = sorted({lv for d, _, lv in counts if d == dataset}, key=_level_sort_key)
        for key in keys:
            cells = [counts.get((dataset, key, lv)) for lv in levels]
            if not any(cells):
                continue
            ys = [math.nan if c is None else 100 * c[0] / c[1] for c in cells]
            ax.plot(levels, ys, marker="o", label=row_label(*key), color=colors[key])
        ax.set_ylim(-3, 105)
        ax.set_xlabel("level")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{dataset}: accuracy by level")
        ax.grid(alpha=0.3)
    _legend_below(fig, list(axes), max_columns=3)
    return _png(fig)


def _step_error_counts(episodes: list[dict]) -> dict[RowKey, Counter]:
    """Per row: ``steps`` and the number of steps of each kind in :data:`ERROR_KINDS`, from ``steps_json``."""
    totals: dict[RowKey, Counter] = {}
    for index, e in enumerate(episodes):
        total = totals.setdefault(_row_key(e), Counter())
        if e["steps_json"] is None:
            continue
        where = f"predictions row {index} (question {e['question_id']!r}, dataset {e['dataset']!r})"
        try:
            steps = json.loads(e["steps_json"])
        except json.JSONDecodeError as exc:
            raise PredictionsError(f"{where}: steps_json is not valid JSON ({exc.msg})") from exc
        if not isinstance(steps, list) or not all(isinstance(s, dict) and "error_kind" in s for s in steps):
            raise PredictionsError(f"{where}: steps_json must be a list of step objects with an 'error_kind'")
        for step in steps:
            kind = step["error_kind"]
            total["steps"] += 1
            if kind not in (None, "none"):
                total[kind if kind in ERROR_KINDS else "other"] += 1
    return totals


def _plot_error_kinds(counts: dict[RowKey, Counter], keys: list[RowKey]) -> bytes:
    """Stacked horizontal bars of error shares per row; rows without SAG on top, rows with SAG below."""
    groups = [
        (title, [k for k in keys if k in counts and is_sag(k[2]) == sag])
        for title, sag in (("without SAG", False), ("with SAG", True))
    ]
    groups = [(title, rows) for title, rows in groups if rows]
    shares = {
        k: {kind: 100 * c[kind] / c["steps"] if c["steps"] else 0.0 for kind in ERROR_KINDS}
        for k, c in counts.items()
    }
    top = max((sum(s.values()) for s in shares.values()), default=0.0)
    fig = _figure(9.0, 1.6 + 0.45 * sum(len(rows) for _, rows in groups) + 0.5 * len(groups))
    axes = fig.subplots(len(groups), 1, sharex=True, squeeze=False,
                        height_ratios=[len(rows) + 1 for _, rows in groups])[:, 0]
    for ax, (title, rows) in zip(axes, groups):
        labels = [row_label(*k) for k in rows]
        left = [0.0] * len(rows)
        for kind in ERROR_KINDS:
            widths = [shares[k][kind] for k in rows]
            ax.barh(labels, widths, left=left, color=ERROR_COLORS[kind], label=ERROR_LABELS[kind])
            left = [a + b for a, b in zip(left, widths)]
        for y, (k, x) in enumerate(zip(rows, left)):
            ax.text(x + top * 0.01 + 0.2, y, f"{x:.1f}% of {counts[k]['steps']} steps", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, loc="left", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlim(0, max(10.0, top * 1.45))
    axes[-1].set_xlabel("share of steps (%)")
    fig.suptitle("Error kinds per step, without and with SAG")
    _legend_below(fig, list(axes))
    return _png(fig)


def _plot_retrieval_calls(episodes: list[dict], colors: dict[RowKey, tuple]) -> bytes:
    """Grouped bars: share of a row's episodes making 0, 1, …, ``RETRIEVAL_CAP``+ retrieval calls."""
    calls: dict[RowKey, list[int]] = {}
    for e in episodes:
        if e["retrieval_calls"] is not None:
            calls.setdefault(_row_key(e), []).append(e["retrieval_calls"])
    keys = [k for k in colors if k in calls]
    fig = _figure(8.0, 4.6)
    ax = fig.add_subplot()
    ax.set_title("Retrieval calls per episode")
    if not keys:
        ax.text(0.5, 0.5, "no retrieval calls recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _png(fig)
    bins = list(range(min(RETRIEVAL_CAP, max(max(v) for v in calls.values())) + 1))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        histogram = Counter(min(c, RETRIEVAL_CAP) for c in calls[key])
        heights = [100 * histogram[b] / len(calls[key]) for b in bins]
        mean = sum(calls[key]) / len(calls[key])
        offsets = [b + (i - (len(keys) - 1) / 2) * width for b in bins]
        ax.bar(offsets, heights, width, color=colors[key], label=f"{row_label(*key)} (mean {mean:.2f})")
    names = [f"{b}+" if b == RETRIEVAL_CAP else str(b) for b in bins]
    ax.set_xticks(bins, names)
    ax.set_xlabel("retrieval calls in the episode")
    ax.set_ylabel("episodes (%)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    _legend_below(fig, [ax], max_columns=3)
    return _png(fig)
