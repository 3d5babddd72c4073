"""The DuckDB query layer: views over the store's Parquet files.

``open_catalog(root)`` returns an in-memory DuckDB connection with one view per table in
``storage.schemas.TABLES`` plus ``artifacts`` (one row per complete artifact). Only artifacts whose
manifest exists are visible, so a pipeline can write while anyone queries. Every view exists even when
no file does (an empty relation with the right columns). Each view has an ``artifact_id`` column (or
``artifact_id`` and ``stage`` for passages/losses/sft_examples, taken from the folder).

Corrupt Parquet files are skipped with a warning that names the file (so one bad part does not hide
everything else); readers of a single artifact (``read_table``) raise instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from common.files import TMP_MARK
from storage.schemas import TABLES, conform
from storage.store import MANIFEST, ArtifactError, ArtifactStore

ARTIFACT_COLUMNS = pa.schema([
    ("stage", pa.string()), ("id", pa.string()), ("created", pa.string()), ("code_version", pa.string()),
    ("parents", pa.list_(pa.string())), ("config", pa.string()), ("row_counts", pa.string()),
    ("metrics", pa.string()), ("path", pa.string()),
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
        parts.append(conform(pq.read_table(path), schema))
    return pa.concat_tables(parts) if parts else schema.empty_table()


def open_catalog(root: Path | str, warn=None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views described in the module docstring."""
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    store = ArtifactStore(root)
    manifests = store.list()
    con = duckdb.connect(":memory:")
    con.from_arrow(_artifacts_table(store, manifests)).create_view("artifacts")
    for table, schema in TABLES.items():
        files = []
        for manifest in manifests:
            artifact_dir = store.root / manifest["stage"] / manifest["id"]
            for path in table_files(artifact_dir, table):
                problem = check_parquet(path)
                if problem:
                    warn(f"skipping corrupt Parquet file {path} ({problem})")
                else:
                    files.append((str(path), manifest["stage"], manifest["id"]))
        _create_view(con, table, schema, files)
    return con


def _artifacts_table(store: ArtifactStore, manifests: list[dict]) -> pa.Table:
    rows = [{
        "stage": m["stage"], "id": m["id"], "created": m.get("created"), "code_version": m.get("code_version"),
        "parents": list(m.get("parents", [])), "config": json.dumps(m.get("config", {}), sort_keys=True),
        "row_counts": json.dumps(m.get("row_counts", {}), sort_keys=True),
        "metrics": json.dumps(m.get("metrics", {}), sort_keys=True),
        "path": str(store.root / m["stage"] / m["id"]),
    } for m in manifests]
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
    selected = ", ".join(f'"{name}"' for name in columns)
    rows.join(owners, "filename").project(f"{selected}, stage, artifact_id_ AS artifact_id").create_view(table)


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
