"""The command line: fast help, queries, and one-line errors with exit code 2 for bad input."""

import os
import subprocess
import sys

import pytest

from flows.cli import build_parser, main

COMMANDS = {"run", "index", "prefixes", "rollout", "train", "evaluate", "query", "artifacts", "serve", "sandbox",
            "retriever"}


def cli(*args, home=None):
    env_home = ["--home", str(home)] if home else []
    return subprocess.run([sys.executable, "-m", "flows.cli", *env_home, *args], capture_output=True, text=True,
                          check=False, timeout=300)


HEAVY = ("torch", "transformers", "prefect", "duckdb", "faiss", "sentence_transformers", "peft", "accelerate")


def test_help_lists_every_command_without_heavy_imports():
    result = cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
    choices = build_parser()._subparsers._group_actions[0].choices
    assert COMMANDS <= set(choices)
    # Fast help (~2 s on an idle machine): none of the heavy libraries is imported to print it. (Checked by
    # what is imported, not by a time, which depends on the machine's load.)
    code = ("import sys\nfrom flows.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert imported.stderr.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("term", [{}, {"TERM": "dumb", "TTY_COMPATIBLE": "1", "COLUMNS": "60"}])
def test_query_on_an_empty_home_prints_an_empty_artifacts_table(home, capsys, monkeypatch, term):
    for name, value in term.items():  # a CI runner's terminal: rich would otherwise draw 80 (or 60) columns
        monkeypatch.setenv(name, value)
    assert main(["--home", str(home), "query", "select * from artifacts"]) == 0
    out = capsys.readouterr().out
    assert "stage" in out and "id" in out and "(0 rows)" in out
    assert "problem" in out and "…" not in out  # every column header whole


@pytest.mark.parametrize("fmt, expected", [("csv", "n\n3\n"), ("json", '{"n": 3}\n')])
def test_query_formats(home, capsys, fmt, expected):
    assert main(["--home", str(home), "query", "select 3 as n", "--format", fmt]) == 0
    assert capsys.readouterr().out == expected


def test_bad_sql_is_one_line_and_exit_2(home):
    result = cli("query", "select no_such_column from artifacts", home=home)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0
    assert "query failed" in result.stderr and "no_such_column" in result.stderr


def test_unknown_set_key_is_one_line_and_exit_2(home):
    result = cli("index", "--set", "index.no_such_key=1", home=home)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "unknown config key 'index.no_such_key'" in result.stderr
    assert "Traceback" not in result.stderr


def test_malformed_config_file_names_file_and_line(home, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("index:\n  embedder: [unclosed\n")
    result = cli("index", "--config", str(bad), home=home)
    assert result.returncode == 2 and str(bad) in result.stderr and "malformed YAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_evaluation_method_is_one_line_naming_the_known_ones(home):
    result = cli("evaluate", "--methods", "cot,no-such-method", home=home)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "unknown evaluation method(s) ['no-such-method']; the config has ['teacher-agent', 'cot'" in result.stderr


def test_invalid_value_names_the_field(home):
    result = cli("rollout", "--set", "rollout.num_parts=0", home=home)
    assert result.returncode == 2 and "rollout.num_parts" in result.stderr


def test_unknown_model_spec_is_one_line_and_exit_2(home):
    result = cli("index", "--set", "index.embedder=no-such-embedder", "--set", "index.corpus.limit=3", home=home)
    assert result.returncode == 2, result.stderr
    assert "unknown model spec 'no-such-embedder'" in result.stderr
    assert "Traceback" not in result.stderr
    debug = cli("--debug", "index", "--set", "index.embedder=no-such-embedder", "--set", "index.corpus.limit=3",
                home=home)
    # --debug adds the traceback but keeps the exit code of bad input (before: it re-raised, exit 1).
    assert debug.returncode == 2 and "Traceback" in debug.stderr, debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == result.stderr.strip()  # the same one line, last


def test_artifacts_show_of_a_missing_id_is_a_clear_error(home):
    result = cli("artifacts", "show", "deadbeef", home=home)
    assert result.returncode == 2 and "no complete artifact with id 'deadbeef'" in result.stderr


def test_home_and_debug_go_before_or_after_the_command(home, tmp_path, capsys):
    parser = build_parser()
    for argv in (["--home", "D", "evaluate"], ["evaluate", "--home", "D"],
                 ["retriever", "serve", "--index", "x", "--home", "D"]):
        assert parser.parse_args(argv).home == "D", argv
    assert parser.parse_args(["--debug", "index"]).debug and parser.parse_args(["index", "--debug"]).debug
    assert parser.parse_args(["index"]).home is None and not parser.parse_args(["index"]).debug
    other = tmp_path / "other-home"
    assert main(["query", "select 3 as n", "--home", str(other), "--format", "csv"]) == 0
    assert capsys.readouterr().out == "n\n3\n" and os.environ["DISTILLERY_HOME"] == str(other)


def test_only_user_errors_are_one_line_other_exceptions_keep_their_traceback(home, monkeypatch, capsys):
    from common.errors import UserError

    def fail_with(error):
        def dispatch(args):
            raise error
        monkeypatch.setattr("flows.commands.dispatch", dispatch)

    fail_with(UserError("questions.jsonl:2: not valid JSON"))
    assert main(["--home", str(home), "query", "select 1"]) == 2
    assert capsys.readouterr().err == "error: questions.jsonl:2: not valid JSON\n"
    fail_with(ValueError("a bug, not an input error"))  # before, any ValueError became a one-line "error:"
    with pytest.raises(ValueError, match="a bug"):  # uncaught: Python prints the traceback, exit code 1
        main(["--home", str(home), "query", "select 1"])


def test_retriever_serve_makes_openmp_threads_wait_passively(monkeypatch):
    import flows.commands

    seen = {}
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(flows.commands, "dispatch", lambda args: seen.setdefault("policy",
                                                                                os.environ["OMP_WAIT_POLICY"]))
    main(["retriever", "serve", "--index", "x"])
    assert seen == {"policy": "PASSIVE"}
