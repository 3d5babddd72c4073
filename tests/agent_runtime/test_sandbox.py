"""The sandboxed executor as the agent engine uses it: observations, state, tools, parallel jobs."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from agent_runtime.execution import ExecResult
from agent_runtime.sandbox import (
    DEFAULT_ALLOWED_IMPORTS,
    EpisodeState,
    Sandbox,
    SandboxConfig,
    run_actions,
    split_actions,
)

CFG = SandboxConfig(workers=2, cpu_time_s=3, wall_time_s=10, memory_mb=768, max_output_chars=500)


class RecordingSearch:
    """A search callable standing in for the retriever: records queries, fails on request."""

    def __init__(self) -> None:
        self.queries: list[str] = []

    def __call__(self, query: str) -> str:
        self.queries.append(query)
        if query == "explode":
            raise ValueError("index offline")
        return f"Doc 1: about {query}"


@pytest.fixture(scope="module")
def search() -> RecordingSearch:
    return RecordingSearch()


@pytest.fixture(scope="module")
def sandbox(search: RecordingSearch):
    with Sandbox(CFG, search=search) as box:
        yield box


def step(sandbox: Sandbox, state: EpisodeState, code: str) -> tuple[ExecResult, EpisodeState]:
    [(result, new_state)] = sandbox.run([(state, code)])
    return result, new_state


def test_prints_are_the_observation(sandbox):
    result, _ = step(sandbox, sandbox.new_state(), "print('hello', 6 * 7)\nprint('bye')")
    assert result.observation == "hello 42\nbye\n"
    assert (result.error_kind, result.error, result.is_final, result.tool_calls) == ("none", None, False, 0)
    assert result.duration_s > 0


def test_variables_functions_classes_and_imports_persist(sandbox):
    first = (
        "import numpy as np\nimport sympy\nfrom math import sqrt\nfrom collections import namedtuple\n"
        "K = 3\ndef add(a, b=K):\n    return a + b\n"
        "class Box:\n    def __init__(self, v):\n        self.v = v\n"
        "box = Box(5)\nsquare = lambda v: v * v\nPair = namedtuple('Pair', 'a b')\npair = Pair(1, 2)\n"
        "arr = np.arange(4)\nx = sympy.symbols('x')\nexpr = sympy.expand((x + 1) ** 2)\n"
    )
    result, state = step(sandbox, sandbox.new_state(), first)
    assert result.error_kind == "none", result.observation
    assert {"np", "sympy", "sqrt", "K", "add", "Box", "box", "square", "Pair", "pair", "arr", "expr"} <= set(
        state.variables)
    code = "print(add(1), box.v, square(4), pair.b, arr.sum(), expr, sqrt(16), sympy.solve(x**2 - 4, x))"
    result, _ = step(sandbox, state, code)
    assert result.observation == "4 5 16 2 6 x**2 + 2*x + 1 4.0 [-2, 2]\n"


def test_final_answer_ends_the_action(sandbox):
    result, _ = step(sandbox, sandbox.new_state(), "print('before')\nfinal_answer(6 * 7)\nprint('after')")
    assert result.is_final and result.final_answer == "42"
    assert result.observation == "before\n"
    assert result.error_kind == "none"


def test_web_search_goes_through_the_host(sandbox, search):
    search.queries.clear()
    code = "a = web_search('capital of France')\nb = web_search('Eiffel tower')\nprint(a)\nprint(b)"
    result, _ = step(sandbox, sandbox.new_state(), code)
    assert search.queries == ["capital of France", "Eiffel tower"]
    assert result.observation == "Doc 1: about capital of France\nDoc 1: about Eiffel tower\n"
    assert result.tool_calls == 2


def test_a_failing_search_is_an_execution_error(sandbox):
    result, _ = step(sandbox, sandbox.new_state(), "print(web_search('explode'))")
    assert result.error_kind == "execution"
    assert "web_search failed: ValueError: index offline" in result.observation
    assert result.tool_calls == 1


def test_web_search_without_a_search_tool_raises_clearly():
    with Sandbox(CFG.model_copy(update={"workers": 1})) as box:
        result, _ = step(box, box.new_state(), "web_search('x')")
        assert result.error_kind == "execution"
        assert "web_search is not available" in result.observation
        assert box.isolation()["web_search"].startswith("not available")


def test_errors_read_like_smolagents_and_name_the_line(sandbox):
    result, _ = step(sandbox, sandbox.new_state(), "x = 1\nprint('partial')\ny = x / 0")
    assert result.error_kind == "execution"
    assert result.error == "ZeroDivisionError: division by zero (line 3: y = x / 0)"
    assert result.observation == "partial\nError: ZeroDivisionError: division by zero (line 3: y = x / 0)"


def test_syntax_error(sandbox):
    result, _ = step(sandbox, sandbox.new_state(), "x = 1\nprint(x +)")
    assert result.error_kind == "execution"
    assert result.observation.startswith("Error: SyntaxError: invalid syntax (line 2: print(x +))")


def test_a_failed_step_keeps_the_input_state(sandbox):
    _, state = step(sandbox, sandbox.new_state(), "x = 1")
    result, after = step(sandbox, state, "x = 2\nraise ValueError('boom')")
    assert result.error_kind == "execution" and "ValueError: boom" in result.observation
    assert after is state
    result, _ = step(sandbox, after, "print(x)")
    assert result.observation == "1\n"


def test_jobs_run_on_isolated_copies_in_order(sandbox):
    """SAG: N candidates from one state; each gets its own copy, the input is untouched."""
    _, state = step(sandbox, sandbox.new_state(), "items = [0]")
    payload = state.payload
    jobs = [(state, f"items.append({i})\nprint(items)") for i in range(1, 6)]
    results = sandbox.run(jobs)
    assert [r.observation for r, _ in results] == [f"[0, {i}]\n" for i in range(1, 6)]
    assert state.payload == payload
    for i, (_, new_state) in enumerate(results, start=1):
        result, _ = step(sandbox, new_state, "print(items)")
        assert result.observation == f"[0, {i}]\n"
    result, _ = step(sandbox, state, "print(items)")
    assert result.observation == "[0]\n"


def test_long_output_is_truncated_with_a_note(sandbox):
    result, _ = step(sandbox, sandbox.new_state(), "print('x' * 10_000)")
    assert result.error_kind == "none"
    note = "\n[output truncated: the action printed 10001 characters, only the first 500 are shown]\n"
    assert result.observation == "x" * 500 + note


def test_unserialisable_variables_are_dropped_with_a_note(sandbox):
    result, state = step(sandbox, sandbox.new_state(), "gen = (i for i in range(3))\nkept = 1")
    assert "not kept for the next step (cannot be serialised): gen" in result.observation
    assert state.variables == ("kept",)
    result, _ = step(sandbox, state, "print(gen)")
    assert result.error == "NameError: name 'gen' is not defined (line 1: print(gen))"


def test_every_action_starts_from_the_same_random_state(sandbox):
    code = "import random\nimport numpy as np\nprint(random.random(), np.random.rand())"
    first, _ = step(sandbox, sandbox.new_state(), code)
    second, _ = step(sandbox, sandbox.new_state(), code)
    assert first.error_kind == "none" and first.observation == second.observation


def test_files_stay_inside_a_fresh_working_directory(sandbox):
    code = "with open('notes.txt', 'w') as f:\n    f.write('hi')\nprint(open('notes.txt').read())"
    result, _ = step(sandbox, sandbox.new_state(), code)
    assert result.observation == "hi\n"
    result, _ = step(sandbox, sandbox.new_state(), "open('notes.txt')")
    assert "FileNotFoundError" in result.observation


def test_isolation_reports_what_was_applied(sandbox):
    report = sandbox.isolation()
    for key in ("network", "filesystem", "user", "processes", "rlimits", "wall_clock", "environment",
                "imports", "python_guard", "namespaces", "output", "workers", "web_search"):
        assert isinstance(report[key], str) and report[key]
    assert "CPU 3 s" in report["rlimits"] and "768 MB" in report["rlimits"]
    if os.geteuid() == 0 and report["namespaces"] != "none":  # root with CAP_SYS_ADMIN, as on the dev box
        assert report["network"].startswith("off")
        assert report["filesystem"].startswith("chroot jail")
        assert report["user"].startswith("nobody")


def test_closed_sandbox_stops_its_workers():
    box = Sandbox(CFG.model_copy(update={"workers": 1}))
    procs = [w.proc for w in box._workers]
    root = box._root
    box.close()
    box.close()  # idempotent
    assert all(p.poll() is not None for p in procs)
    assert not os.path.exists(root)
    with pytest.raises(RuntimeError, match="closed"):
        box.run([(box.new_state(), "x = 1")])


def test_split_actions():
    text = "x = 1\nprint(x)\n#---\n\n  #---  \ny = 2\n#---\n"
    assert split_actions(text) == ["x = 1\nprint(x)", "y = 2"]
    assert split_actions("print(1)") == ["print(1)"]
    assert split_actions("#---\n#---") == []


def test_run_actions_is_one_episode_and_stops_at_the_final_answer():
    actions = ["x = 20", "print(x + 1)", "final_answer(x * 2)", "print('never')"]
    results = run_actions(actions, CFG.model_copy(update={"workers": 1}))
    assert [r.observation for r in results] == ["", "21\n", ""]
    assert results[-1].is_final and results[-1].final_answer == "40"


def test_config_is_strict():
    with pytest.raises(ValidationError):
        SandboxConfig(workers=0)
    with pytest.raises(ValidationError):
        SandboxConfig(unknown=1)
    with pytest.raises(ValidationError):
        SandboxConfig(allowed_imports=("numpy.linalg",))
    with pytest.raises(ValidationError):
        SandboxConfig(network="off")
    assert {"collections", "math", "numpy", "sympy", "re", "statistics"} <= set(DEFAULT_ALLOWED_IMPORTS)
    assert SandboxConfig.model_fields["cpu_time_s"].description


def test_a_killed_worker_is_replaced_and_the_run_goes_on():
    import signal
    import threading

    with Sandbox(CFG.model_copy(update={"workers": 1})) as box:
        _, state = step(box, box.new_state(), "x = 7")
        victim = box._workers[0].proc.pid
        threading.Timer(1.0, os.killpg, (victim, signal.SIGKILL)).start()
        result, after = step(box, state, "import time\ntime.sleep(5)")
        assert result.error_kind == "crash" and "sandbox worker failed" in result.observation
        assert after is state
        result, _ = step(box, state, "print(x * 6)")
        assert result.observation == "42\n"
        assert box._workers[0].proc.pid != victim


def test_a_worker_that_cannot_start_is_a_clear_error(monkeypatch):
    import agent_runtime.sandbox.host as sandbox_host

    monkeypatch.setattr(sandbox_host, "_BOOTSTRAP", "raise SystemExit(3)")
    with pytest.raises(RuntimeError, match="sandbox worker failed to start: the worker process exited"):
        Sandbox(CFG.model_copy(update={"workers": 1}))


def test_the_worker_process_loads_only_the_worker_side_of_the_package():
    """The bootstrap registers the packages bare: no __init__.py runs, so neither pydantic nor the
    host side (``agent_runtime.sandbox.host``) is loaded into a worker."""
    import subprocess
    import sys

    import agent_runtime.sandbox.host as sandbox_host

    start = "main(sys.argv[2])\n"
    assert sandbox_host._BOOTSTRAP.endswith(start)
    report = "print(sorted(m for m in sys.modules if m.split('.')[0] in ('agent_runtime', 'pydantic')))\n"
    bootstrap = sandbox_host._BOOTSTRAP.removesuffix(start) + report
    sandbox_dir = os.path.dirname(sandbox_host.__file__)
    proc = subprocess.run([sys.executable, "-s", "-P", "-c", bootstrap, sandbox_dir], capture_output=True,
                          text=True, env=sandbox_host._WORKER_ENV, check=True)
    loaded = [f"agent_runtime.sandbox.{name}" for name in ("action", "guard", "isolation", "protocol", "state",
                                                            "worker")]
    assert proc.stdout == repr(["agent_runtime", "agent_runtime.sandbox", *loaded]) + "\n"


def test_jobs_must_be_state_and_code(sandbox):
    with pytest.raises(TypeError, match="job 0 must be"):
        sandbox.run([("x = 1", sandbox.new_state())])
