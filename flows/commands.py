"""What each ``distillery`` command does (argument parsing lives in ``flows/cli.py``)."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from storage.store import ArtifactStore, default_root


class StageNotBuilt(ValueError):
    """A stage that this version of distillery does not have yet."""


def dispatch(args) -> int:
    handler = {
        "query": query, "artifacts": artifacts, "run": run, "index": index, "prefixes": prefixes,
        "rollout": rollout, "train": train, "evaluate": evaluate, "serve": serve, "sandbox": sandbox,
        "retriever": retriever,
    }[args.command]
    return handler(args)


def store() -> ArtifactStore:
    return ArtifactStore(default_root())


# ----------------------------------------------------------------------------- inspection

def query(args) -> int:
    from storage.catalog import query as run_query

    columns, rows = run_query(store().root, args.sql)
    sys.stdout.write(format_rows(columns, rows, args.format))
    return 0


def format_rows(columns: list[str], rows: list[tuple], fmt: str) -> str:
    if fmt == "json":
        return "".join(json.dumps(dict(zip(columns, row)), default=str) + "\n" for row in rows)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        writer.writerows(rows)
        return buffer.getvalue()
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, show_lines=False)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console = Console(file=io.StringIO(), width=200, no_color=True)
    console.print(table)
    console.print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return console.file.getvalue()


def artifacts(args) -> int:
    current = store()
    if args.action == "list":
        manifests = current.list(args.stage)
        columns = ["stage", "id", "created", "parents", "row_counts"]
        rows = [(m["stage"], m["id"], m.get("created"), ",".join(m.get("parents", [])),
                 json.dumps(m.get("row_counts", {}))) for m in manifests]
        sys.stdout.write(format_rows(columns, rows, "table"))
        return 0
    if not args.id:
        raise ValueError(f"`distillery artifacts {args.action}` needs an artifact id")
    if args.action == "show":
        print(json.dumps(current.manifest(args.id), indent=2, sort_keys=True))
    else:
        for depth, manifest in enumerate(current.lineage(args.id)):
            print(f"{'  ' * min(depth, 1)}{manifest['stage']}/{manifest['id']}  parents={manifest.get('parents', [])}")
    return 0


# ----------------------------------------------------------------------------- stages

def load(args):
    from flows.config import PipelineConfig
    from flows.settings import load_config

    return load_config(PipelineConfig, args.config, args.overrides)


def not_built(stage: str) -> int:
    raise StageNotBuilt(f"the {stage!r} stage is not built yet in this version of distillery")


def run(args) -> int:
    return not_built("run")


def index(args) -> int:
    return not_built("index")


def prefixes(args) -> int:
    return not_built("prefixes")


def rollout(args) -> int:
    return not_built("rollout")


def train(args) -> int:
    return not_built("train")


def evaluate(args) -> int:
    return not_built("evaluate")


def serve(args) -> int:
    return not_built("serve")


def sandbox(args) -> int:
    return not_built("sandbox")


def retriever(args) -> int:
    return not_built("retriever serve")


def print_ref(ref, out=sys.stdout) -> None:
    print(f"{ref.stage} {ref.id} {Path(ref.root) / ref.stage / ref.id}", file=out)
