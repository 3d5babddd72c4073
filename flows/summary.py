"""What ``distillery run``/``evaluate`` print at the end: the metrics table, the report, example queries."""

from __future__ import annotations

from storage.catalog import read_table
from storage.store import ArtifactStore

EXAMPLE_QUERIES = (
    "select method, dataset, accuracy from metrics",
    "select dataset, count(*), avg(correct::int) from episodes group by all",
    "select step, error_kind, count(*) from steps group by all order by 1, 2",
    "select stage, id, parents from artifacts",
)

# Small runs (the demo) show every stage on real models; whether distillation helps is the study's question.
STUDY_POINTER = ("whether distillation helps is the study's question: results/cpu-study/report.md "
                 "(configs/cpu-study.yaml, the 1.5B teacher distilled into 0.5B students)")


def print_summary(store: ArtifactStore, results: dict) -> None:
    from evaluation.report import table2_markdown

    for name, ref in results.items():
        print(f"{name}: {ref.stage}/{ref.id}")
    evaluation = results.get("evaluation")
    if evaluation is not None:
        print()
        print(table2_markdown(read_table(evaluation.path, "metrics")))
        print(f"\nreport: {evaluation.path / 'report.md'}")
        print(STUDY_POINTER)
    print("\nexplore the artifacts with DuckDB, e.g.:")
    for sql in EXAMPLE_QUERIES:
        print(f'  distillery query "{sql}"')
