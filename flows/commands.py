"""What each ``distillery`` command does (argument parsing lives in ``flows/cli.py``)."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

from common.errors import UserError
from storage.store import ArtifactStore, default_root


def dispatch(args) -> int:
    from flows.cli import stage_commands

    if args.command in stage_commands():
        return build(args)
    handler = {
        "regrade": regrade, "query": query, "artifacts": artifacts, "serve": serve, "server": server,
        "sandbox": sandbox, "retriever": retriever, "models": models,
    }[args.command]
    return handler(args)


def store() -> ArtifactStore:
    return ArtifactStore(default_root())


# ----------------------------------------------------------------------------- inspection

def models(args) -> int:
    from flows.model_commands import install_models, list_models

    return install_models(args.specs) if args.action == "install" else list_models(args.specs, args.format)


def query(args) -> int:
    import duckdb

    from storage.catalog import query as run_query

    try:
        columns, rows = run_query(store().root, args.sql)
    except duckdb.Error as exc:  # a mistake in the user's SQL: DuckDB's message says where
        raise UserError(f"query failed: {' '.join(str(exc).split())}") from exc
    sys.stdout.write(format_rows(columns, rows, args.format))
    return 0


def format_rows(columns: list[str], rows: list[tuple], fmt: str) -> str:
    if fmt == "json":
        return "".join(json.dumps(dict(zip(columns, row)), default=str) + "\n" for row in rows)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        return buffer.getvalue()
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, show_lines=False)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    # width and height both given: rich then ignores TERM=dumb (80 columns) and COLUMNS
    console = Console(file=io.StringIO(), width=200, height=50, no_color=True)
    console.print(table)
    console.print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return console.file.getvalue()


def artifacts(args) -> int:
    current = store()
    if args.action == "list":
        states = current.scan(args.stage)
        columns = ["stage", "id", "state", "created", "parents", "row_counts"]
        rows = [(s.stage, s.id, s.state, (s.manifest or {}).get("created"),
                 ",".join((s.manifest or {}).get("parents", [])),
                 json.dumps(s.manifest["row_counts"]) if s.manifest else "; ".join(s.problems))
                for s in sorted(states, key=lambda s: ((s.manifest or {}).get("created", ""), s.id))]
        sys.stdout.write(format_rows(columns, rows, "table"))
        return 0
    if args.action == "verify":
        return verify_artifacts(current, args.id)
    if len(args.id) != 1:
        raise UserError(f"`distillery artifacts {args.action}` needs one artifact id")
    args.id = args.id[0]
    if args.action == "export":
        from storage.transfer import export_artifact

        ref = current.resolve(args.id)
        out = args.out or Path(f"{ref.stage}-{ref.id}.tar.gz")
        info = export_artifact(current, ref.id, out, with_parents=args.with_parents)
        print(f"exported {', '.join(info['artifacts'])} (lineage of {len(info['lineage'])}) to {out} "
              f"({out.stat().st_size / 2**20:.1f} MiB)")
    elif args.action == "import":
        from storage.transfer import import_archive

        for key, state in import_archive(current, Path(args.id)):
            print(f"{key}: {state}")
    elif args.action == "show":
        print(json.dumps(current.manifest(args.id), indent=2, sort_keys=True))
    else:
        for depth, manifest in enumerate(current.lineage(args.id)):
            where = " (not in this home)" if manifest.get("missing") else ""
            print(f"{'  ' * min(depth, 1)}{manifest['stage']}/{manifest['id']}{where}  "
                  f"parents={manifest.get('parents', [])}")
    return 0


def verify_artifacts(current: ArtifactStore, ids: list[str]) -> int:
    """Re-hash the artifacts ``ids`` (default: all); one line per bad file, exit 2 if any is corrupt."""
    import time

    started = time.perf_counter()
    states = [current.state(current.find(id_), hashes=True) for id_ in ids] if ids else current.scan(hashes=True)
    for found in states:
        where = f"{found.stage}/{found.id}"
        if found.state == "corrupt":
            print("\n".join(f"corrupt: {where}/{problem}" for problem in found.problems))
        elif found.state == "incomplete":
            print(f"incomplete: {where}: no manifest yet (being written, or its writer died)")
        elif not found.checksummed:
            print(f"unverified: {where}: its manifest records no checksums (written before they were recorded)")
    files = [f for s in states if s.manifest for f in s.manifest.get("files", {}).values()]
    counts = {state: sum(s.state == state for s in states) for state in ("corrupt", "incomplete")}
    unverified = sum(s.state == "complete" and not s.checksummed for s in states)
    print(f"checked {len(states)} artifacts ({len(files)} files, {sum(f['bytes'] for f in files) / 2**20:.1f} MiB) "
          f"in {time.perf_counter() - started:.1f} s: {counts['corrupt']} corrupt, {unverified} unverified, "
          f"{counts['incomplete']} incomplete")
    return 2 if counts["corrupt"] else 0


def regrade(args) -> int:
    """Re-grade a stored evaluation in this process: no model runs, so no Prefect flow is needed."""
    from evaluation.grading import GRADER_VERSION
    from evaluation.regrade import regrade_evaluation
    from flows.summary import print_summary

    result = regrade_evaluation(store(), args.id)
    print_summary(store(), {"evaluation": result.ref})
    state = "existed already" if result.cached else "written"
    print(f"\nre-graded {result.predictions} predictions of evaluate/{result.source.id} with grader version "
          f"{GRADER_VERSION}: {result.changed} verdicts changed (artifact {state})")
    return 0


# ----------------------------------------------------------------------------- stages

def load(args, limits: dict | None = None, methods: list[str] | None = None):
    """The pipeline config of ``--config``/``--set``; ``limits`` adds overrides for options like --limit,
    ``methods`` keeps only these evaluation methods (by name, in the config's order)."""
    from flows.config import PipelineConfig
    from flows.settings import load_config

    extra = [f"{key}={value}" for key, value in (limits or {}).items() if value is not None]
    cfg = load_config(PipelineConfig, args.config, [*args.overrides, *extra])
    if methods:
        cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.only_methods(methods)})
    return cfg


def build(args) -> int:
    """``distillery run`` or ``distillery <stage>``: build what the plan misses, print what was built.

    The inputs the command will read (datasets, corpus, models, adapters) are checked first, before any flow
    starts (``flows.plans.check_plan``). Without a Prefect server there is no run history to record, so a
    plan that is complete is reported from the store without starting Prefect's ephemeral API (which alone
    takes ~15 s to start).
    """
    from flows.plans import check_plan, plan_pipeline
    from flows.stages import PIPELINE, StageOptions
    from flows.summary import print_summary

    cfg = load(args, *stage_flags(args))
    targets = PIPELINE if args.command == "run" else (args.command,)
    plan = plan_pipeline(store(), cfg, targets)
    check_plan(plan, cfg)
    home = str(store().root)
    if args.command == "run":
        if not os.environ.get("PREFECT_API_URL") and plan.complete():
            results = plan.results()
            print("(cached: every stage with this config already exists)", file=sys.stderr)
        else:
            from flows.pipeline import pipeline_flow

            results = pipeline_flow(cfg=cfg, home=home)
        print_summary(store(), results)
        return 0
    if not os.environ.get("PREFECT_API_URL") and plan.complete():
        refs = plan.of(args.command)
        print(f"(cached: {args.command} with this config already exists)", file=sys.stderr)
    else:
        from flows.pipeline import run_stage_flow

        refs = run_stage_flow(args.command, cfg, home, StageOptions(**launch_options(args)))
    if args.command == "evaluate":
        print_summary(store(), {"evaluation": refs["evaluate"]})
    else:
        for ref in refs.values():
            print_ref(ref)
    return 0


def stage_flags(args) -> tuple[dict, list[str] | None]:
    """The config overrides a stage command's own flags make (``--limit``), and ``--methods``."""
    limits = {}
    if args.command in ("rollout", "evaluate") and args.limit is not None:
        limits[f"{args.command}.limit"] = args.limit
    if args.command == "evaluate":
        limits |= {"evaluate.runner": args.runner, "evaluate.address": args.address}
        if args.methods:
            return limits, [name.strip() for name in args.methods.split(",") if name.strip()]
    return limits, None


def launch_options(args) -> dict:
    """``train``'s --resume and --launcher accelerate --accelerate-config."""
    if args.command != "train":
        return {}
    if args.launcher == "accelerate" and not args.accelerate_config:
        raise UserError("--launcher accelerate needs --accelerate-config PATH (see configs/accelerate/)")
    if args.launcher == "accelerate" and not args.accelerate_config.is_file():
        raise UserError(f"accelerate config not found: {args.accelerate_config} (see configs/accelerate/)")
    config = str(args.accelerate_config.resolve()) if args.launcher == "accelerate" else None
    return {"resume": args.resume, "accelerate_config": config}


def serve(args) -> int:
    from flows.deployments import register_in_pool, serve_deployments

    cfg, home = load(args), str(store().root.resolve())
    if args.pool:
        ids = register_in_pool(cfg, home, args.pool, schedule_active=not args.no_schedule)
        print(f"registered {len(ids)} deployments in work pool {args.pool!r}; "
              f"run them with: prefect worker start --pool {args.pool} --type process")
        return 0
    serve_deployments(cfg, home, schedule_active=not args.no_schedule)
    return 0


def server(args) -> int:
    from flows.server import run_server, serve_argv

    load(args)  # a bad profile fails here, before the server takes a minute to start
    return run_server(store().root, args.port, serve_argv(args.config, args.overrides, args.no_schedule),
                      pool=args.pool)


def sandbox(args) -> int:
    from agent_runtime.sandbox import run_actions, split_actions

    cfg = load(args)
    text = args.code if args.code is not None else read_text(args.file)
    actions = split_actions(text)
    if not actions:
        where = args.file or "the -c code"
        raise UserError(f"no actions to run in {where} (actions are separated by lines '#---')")
    search = open_search(cfg, args.index) if args.index else None
    results = run_actions(actions, cfg.sandbox, search=search)
    for number, result in enumerate(results, 1):
        status = "final" if result.is_final else result.error_kind
        print(f"--- action {number} [{status}, {result.duration_s * 1000:.0f} ms, tool calls: {result.tool_calls}]")
        print(result.observation)
        if result.is_final:
            print(f"final_answer: {result.final_answer}")
    return 0 if all(r.error_kind == "none" for r in results) else 1


def read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"actions file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: actions file is not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def open_search(cfg, index_id: str):
    """A ``web_search(query) -> str`` callable backed by a stored index."""
    from tasks.resources import search_for

    ref = store().resolve(index_id)
    if ref.stage != "index":
        raise UserError(f"--index {index_id}: artifact {ref.id} is a {ref.stage} artifact, not an index")
    return search_for(ref, cfg.index, cfg.search)


def retriever(args) -> int:
    from retrieval.index import load_index, read_index_meta
    from retrieval.service import serve as serve_http

    limits = load(args).retriever_service
    folder = store().find(args.index)
    meta = read_index_meta(folder)
    print(f"serving index {folder.name} ({meta['count']} passages, {meta['embedder']}) on "
          f"http://{args.host}:{args.port}/retrieve", file=sys.stderr)
    serve_http(load_index(folder, meta["embedder"]), host=args.host, port=args.port, cfg=limits)
    return 0


def print_ref(ref) -> None:
    print(f"{ref.stage} {ref.id} {Path(ref.root) / ref.stage / ref.id}")
