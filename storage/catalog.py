"""The DuckDB query layer: views over the store's Parquet files.

``open_catalog(root)`` returns an in-memory DuckDB connection with one view per table in
``storage.schemas.TABLES``, ``token_kl`` (the opd stage's reverse KL per iteration, dataset, step and segment)
and ``artifacts`` (one row per artifact folder, with its ``state``: ``complete``,
``incomplete`` (no manifest yet) or ``corrupt``, and ``problem``). Only the Parquet files of artifacts whose
manifest exists are visible, so a pipeline can write while anyone queries. Every view exists even when
no file does (an empty relation with the right columns). Each view has an ``artifact_id`` column (or
``artifact_id`` and ``stage`` for passages/losses/sft_examples, taken from the folder).

DuckDB does not check Parquet page checksums, so the catalog re-hashes the Parquet files it puts in a view
against the manifest (once per process per file, see ``storage.integrity``). A file that fails (or that
pyarrow cannot read) is skipped with a warning that names it, so one bad part does not hide everything
else, and its artifact is listed as ``corrupt``; so is one whose manifest is unreadable (one warning line
each; an incomplete folder is normal while a stage writes, and gets none). Readers of a single artifact
(``read_table``) raise instead, and verify page checksums.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from common.files import TMP_MARK
from storage.integrity import check_files
from storage.schemas import TABLES, conform
from storage.store import MANIFEST, ArtifactError, ArtifactState, ArtifactStore

ARTIFACT_COLUMNS = pa.schema([
    ("stage", pa.string()), ("id", pa.string()), ("created", pa.string()), ("code_version", pa.string()),
    ("parents", pa.list_(pa.string())), ("config", pa.string()), ("row_counts", pa.string()),
    ("metrics", pa.string()), ("path", pa.string()), ("state", pa.string()), ("problem", pa.string()),
])


def table_files(artifact_dir: Path, table: str) -> list[Path]:
    """The Parquet files of ``table`` in one artifact: ``<table>.parquet`` or ``<table>/part-*.parquet``."""
    files = [artifact_dir / f"{table}.parquet"] if (artifact_dir / f"{table}.parquet").is_file() else []
    files += sorted(p for p in (artifact_dir / table).glob("*.parquet") if TMP_MARK not in p.name)
    return files


def check_parquet(path: Path) -> str | None:
    """None when ``path`` is a readable Parquet file, else the reason it is not."""
    try:
        pq.read_metadata(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a truncated or foreign file
        return f"{type(exc).__name__}: {exc}"
    return None


def read_table(artifact_dir: Path, table: str) -> pa.Table:
    """All rows of ``table`` in one artifact, cast to its schema; a corrupt file raises naming it."""
    schema = TABLES[table]
    parts = []
    for path in table_files(artifact_dir, table):
        problem = check_parquet(path)
        if problem:
            raise ArtifactError(f"corrupt Parquet file {path}: {problem}")
        try:
            parts.append(conform(pq.read_table(path, page_checksum_verification=True), schema))
        except OSError as exc:  # a page whose CRC does not match: damaged since it was written
            raise ArtifactError(f"corrupt Parquet file {path}: {exc}") from exc
    return pa.concat_tables(parts) if parts else schema.empty_table()


def open_catalog(root: Path | str, warn=None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views described in the module docstring."""
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    store = ArtifactStore(root)
    found, files = [], {table: [] for table in TABLES}
    for state in store.scan():
        if state.manifest is not None:
            state = _add_table_files(state, files)
        if state.state == "corrupt":
            left_out = "its damaged Parquet files are skipped" if state.manifest else "it is skipped"
            warn(f"corrupt artifact {state.stage}/{state.id} ({state.path}): {'; '.join(state.problems)}; {left_out}")
        found.append(state)
    con = duckdb.connect(":memory:")
    con.from_arrow(_artifacts_table(found)).create_view("artifacts")
    for table, schema in TABLES.items():
        _create_view(con, table, schema, files[table])
    con.execute(TOKEN_KL)
    return con


# The opd stage's reverse KL of the student to the teacher on the student's own tokens (k1 estimate: the mean
# of log π_student − log π_teacher), per iteration artifact, dataset, agent step and segment.
TOKEN_KL = """
create view token_kl as
select artifact_id, iteration, dataset, step, segment, count(*) as tokens,
       avg(student_logprob - teacher_logprob) as kl,
       avg(student_logprob) as student_logprob, avg(teacher_logprob) as teacher_logprob
from opd_tokens group by all
"""


def _add_table_files(state: ArtifactState, files: dict[str, list]) -> ArtifactState:
    """Add the artifact's good Parquet files to ``files``; the state with the problems of the bad ones."""
    recorded, problems = state.manifest.get("files", {}), list(state.problems)
    for table in TABLES:
        for path in table_files(state.path, table):
            name = path.relative_to(state.path).as_posix()
            mismatch = check_files(state.path, recorded, only=[name])
            if mismatch:
                problem = mismatch[0]
            elif reason := check_parquet(path):  # e.g. an artifact written before checksums were recorded
                problem = f"{name}: {reason}"
            else:
                files[table].append((str(path), state.stage, state.id))
                continue
            if problem not in problems:
                problems.append(problem)
    return replace(state, state="corrupt" if problems else "complete", problems=tuple(problems))


def _artifacts_table(found: list[ArtifactState]) -> pa.Table:
    rows = []
    for s in sorted(found, key=lambda s: ((s.manifest or {}).get("created", ""), s.stage, s.id)):
        m = s.manifest or {}
        rows.append({
            "stage": s.stage, "id": s.id, "created": m.get("created"), "code_version": m.get("code_version"),
            "parents": list(m.get("parents", [])) if m else None,
            "config": json.dumps(m["config"], sort_keys=True) if "config" in m else None,
            "row_counts": json.dumps(m["row_counts"], sort_keys=True) if "row_counts" in m else None,
            "metrics": json.dumps(m["metrics"], sort_keys=True) if "metrics" in m else None,
            "path": str(s.path), "state": s.state, "problem": "; ".join(s.problems) if s.problems else None,
        })
    return pa.Table.from_pylist(rows, schema=ARTIFACT_COLUMNS)


def _create_view(con, table: str, schema: pa.Schema, files: list[tuple[str, str, str]]) -> None:
    """A view with ``schema``'s columns plus ``stage`` and ``artifact_id`` (taken from the folder)."""
    columns = [name for name in schema.names if name != "artifact_id"]
    if not files:
        empty = pa.schema([schema.field(n) for n in columns]
                          + [pa.field("stage", pa.string()), pa.field("artifact_id", pa.string())]).empty_table()
        con.from_arrow(empty).create_view(table)
        return
    paths, stages, ids = (list(column) for column in zip(*files))
    owners = con.from_arrow(pa.table({"filename": paths, "stage": stages, "artifact_id_": ids}))
    rows = con.read_parquet(paths, filename=True, union_by_name=True)
    # A column added to the schema after an artifact was written reads as NULL in that artifact's rows.
    present = set(rows.columns)
    selected = ", ".join(f'"{name}"' if name in present else f'CAST(NULL AS {_sql_type(schema.field(name).type)}) AS "{name}"'
                         for name in columns)
    rows.join(owners, "filename").project(f"{selected}, stage, artifact_id_ AS artifact_id").create_view(table)


def _sql_type(arrow_type: pa.DataType) -> str:
    """The DuckDB type of an Arrow column type of the schemas (for a column an older file lacks)."""
    for test, name in ((pa.types.is_boolean, "BOOLEAN"), (pa.types.is_int32, "INTEGER"), (pa.types.is_int64, "BIGINT"),
                       (pa.types.is_float32, "FLOAT"), (pa.types.is_float64, "DOUBLE"), (pa.types.is_string, "VARCHAR")):
        if test(arrow_type):
            return name
    raise TypeError(f"no DuckDB type for the Arrow type {arrow_type} of a column older files lack")


def query(root: Path | str, sql: str, params: list | None = None) -> tuple[list[str], list[tuple]]:
    """Run one SQL statement against the catalog; returns (column names, rows)."""
    con = open_catalog(root)
    try:
        result = con.execute(sql, params or [])
        columns = [d[0] for d in result.description] if result.description else []
        return columns, result.fetchall()
    finally:
        con.close()


def manifest_exists(artifact_dir: Path) -> bool:
    return (artifact_dir / MANIFEST).is_file()
