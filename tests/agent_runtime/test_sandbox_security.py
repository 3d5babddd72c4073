"""Hostile actions: each must be blocked or contained, the host must live on, and the next action of
the same episode must still work (with the episode's variables intact)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent_runtime.sandbox import DEFAULT_ALLOWED_IMPORTS, Sandbox, SandboxConfig

CFG = SandboxConfig(workers=2, cpu_time_s=1, wall_time_s=3, memory_mb=512, file_size_mb=4)
CANARY = "/tmp/distillery-sandbox-canary"  # hostile actions try to create it on the host

BLOCKED = "forbidden"
# (id, code, the error kind expected)
HOSTILE = [
    # imports outside the allowlist
    ("import_os", "import os\nos.system('touch /tmp/distillery-sandbox-canary')", BLOCKED),
    ("import_subprocess", "import subprocess\nsubprocess.run(['id'])", BLOCKED),
    ("import_ctypes", "import ctypes\nctypes.CDLL(None).abort()", BLOCKED),
    ("import_socket", "import socket\nsocket.create_connection(('1.1.1.1', 80))", BLOCKED),
    ("from_os_import", "from os import system\nsystem('id')", BLOCKED),
    ("import_importlib", "import importlib\nimportlib.import_module('os')", BLOCKED),
    ("import_builtins", "import builtins\nbuiltins.open('/etc/passwd')", BLOCKED),
    ("import_pickle", "import pickle\npickle.loads(b'cos\\nsystem\\n(S\"id\"\\ntR.')", BLOCKED),
    ("private_module", "import numpy._core.multiarray", BLOCKED),
    ("denied_submodule", "import numpy.ctypeslib", BLOCKED),
    ("alias_to_builtins", "import math as __builtins__", BLOCKED),
    # dynamic code and the import machinery
    ("dunder_import", "__import__('os').system('id')", BLOCKED),
    ("builtins_dict", "__builtins__['__import__']('os')", BLOCKED),
    ("eval", "eval(\"__import__('os')\")", BLOCKED),
    ("exec", "exec('import os')", BLOCKED),
    ("compile", "code = compile('import os', 'x', 'exec')", BLOCKED),
    ("globals", "globals()['__builtins__']", BLOCKED),
    ("vars_module", "import math\nvars(math)", BLOCKED),
    ("breakpoint", "breakpoint()", BLOCKED),
    # dunder walks to Popen / os
    ("subclasses_popen",
     "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'Popen'][0](['id'])",
     BLOCKED),
    ("object_subclasses", "object.__subclasses__()", BLOCKED),
    ("mro_walk", "int.__mro__[1].__subclasses__()", BLOCKED),
    ("getattr_dunder_string", "getattr(getattr((), '__class__'), '__bases__')", BLOCKED),
    ("function_globals", "def f():\n    pass\nf.__globals__['__builtins__']", BLOCKED),
    ("module_dict", "import math\nmath.__dict__", BLOCKED),
    ("format_field_object", "import string\nstring.Formatter().get_field('0.__class__', [1], {})", BLOCKED),
    ("attrgetter", "import operator\noperator.attrgetter('__class__.__base__')(1)", BLOCKED),
    ("methodcaller", "import operator\noperator.methodcaller('__subclasses__')(object)", BLOCKED),
    ("typing_forward_ref",
     "import typing\ndef f(x: '().__class__.__base__.__subclasses__()'):\n    pass\ntyping.get_type_hints(f)",
     BLOCKED),
    # sys.modules and submodule leaks
    ("sys_modules", "import sys\nsys.modules['os'].system('id')", BLOCKED),
    ("random_private_os", "import random\nrandom._os.system('id')", BLOCKED),
    ("getattr_private_os", "import random\ngetattr(random, '_os')", BLOCKED),
    ("from_random_import_os", "from random import _os", BLOCKED),
    ("numpy_testing_leak", "import numpy as np\nnp.testing", BLOCKED),
    ("sympy_preview_os", "import sympy.printing.preview as preview\npreview.os.system('id')", BLOCKED),
    ("numpy_ctypes_attr", "import numpy as np\nnp.arange(3).ctypes", BLOCKED),
    ("as_strided", "from numpy.lib.stride_tricks import as_strided", BLOCKED),
    ("sympify_string_eval", "import sympy\nsympy.sympify(\"__import__('os').system('id')\")", BLOCKED),
    ("sympify_dunder_walk", "import sympy\nsympy.sympify('().__class__.__base__.__subclasses__()')", BLOCKED),
    ("lambdify_exec", "import sympy\nsympy.lambdify(sympy.Symbol('x'), 'x')", BLOCKED),
    ("module_setattr", "import math\nmath.pi = 3", BLOCKED),
    ("match_capture_builtins", "match {}:\n    case {**__builtins__}:\n        pass", BLOCKED),
    # frame and traceback walks
    ("generator_frame", "def g():\n    yield 1\nit = g()\nit.gi_frame.f_back.f_globals", BLOCKED),
    ("traceback_frame", "try:\n    1 / 0\nexcept Exception as e:\n    e.__traceback__.tb_frame.f_back",
     BLOCKED),
    ("getattr_frame", "def g():\n    yield 1\ngetattr(g(), 'gi_frame')", BLOCKED),
    # files and environment
    ("open_write_outside", f"open('{CANARY}', 'w').write('x')", BLOCKED),
    ("open_write_parent", "open('../escape.txt', 'w').write('x')", BLOCKED),
    ("read_etc_passwd", "print(open('/etc/passwd').read())", BLOCKED),
    ("read_passwd_traversal", "print(open('../../../../etc/passwd').read())", BLOCKED),
    ("open_file_descriptor", "print(open(0).read())", BLOCKED),
    ("numpy_loadtxt_passwd", "import numpy as np\nprint(np.loadtxt('/etc/passwd', dtype=str))", BLOCKED),
    ("numpy_tofile", f"import numpy as np\nnp.arange(3).tofile('{CANARY}')", BLOCKED),
    ("environment_variables", "import os\nprint(os.environ)", BLOCKED),
    ("oversized_file", "with open('big.bin', 'w') as f:\n    f.write('x' * (8 << 20))", "execution"),
    # processes and resources
    ("fork_loop", "import os\nwhile True:\n    os.fork()", BLOCKED),
    ("bytearray_10_10", "x = bytearray(10**10)", "memory"),
    # 50 MB steps: the 512 MB limit is hit within the 3 s wall clock even on a loaded 2-core machine (10 MB steps
    # timed out there first).
    ("memory_growth", "x = []\nwhile True:\n    x.append(bytearray(5 * 10**7))", "memory"),
    ("huge_power", "x = 10**10**8", "timeout"),
    ("busy_loop", "while True:\n    pass", "timeout"),
    ("sleep", "import time\ntime.sleep(60)", "timeout"),
    ("deep_recursion", "def f(n):\n    return f(n + 1)\nf(0)", "execution"),
    ("deep_nesting_repr", "x = []\nfor _ in range(200000):\n    x = [x]\nprint(x)", "execution"),
    ("print_100_mb", "print('x' * 100_000_000)", "none"),
    ("print_forever", "while True:\n    print('spam' * 100)", "timeout"),
    ("system_exit", "raise SystemExit(0)", "execution"),
    ("keyboard_interrupt", "raise KeyboardInterrupt", "execution"),
]


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(CFG, search=lambda query: f"result for {query}") as box:
        yield box


@pytest.fixture(scope="module")
def episode(sandbox):
    """An episode with a variable and a function defined in earlier steps."""
    [(result, state)] = sandbox.run([(sandbox.new_state(), "secret = 41\ndef bump(v):\n    return v + 1")])
    assert result.error_kind == "none"
    return state


def test_the_suite_is_big_enough():
    assert len(HOSTILE) >= 30
    assert len({case[0] for case in HOSTILE}) == len(HOSTILE)
    assert sum(kind == BLOCKED for _, _, kind in HOSTILE) >= 30


@pytest.mark.parametrize(("code", "kind"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_action_is_contained(sandbox, episode, code, kind):
    [(result, state)] = sandbox.run([(episode, code)])
    assert result.error_kind == kind, result.observation
    if kind != "none":
        assert result.observation.startswith("Error: ")
        assert state is episode  # a failed action leaves the episode as it was
    assert "root:x:0:0" not in result.observation  # /etc/passwd never leaks
    assert len(result.observation) <= CFG.max_output_chars + 300
    assert not os.path.exists(CANARY)
    # the host is alive (we are running) and the same episode goes on
    [(after, _)] = sandbox.run([(state, "print(bump(secret))")])
    assert (after.error_kind, after.observation) == ("none", "42\n")


def test_workers_survive_a_burst_of_hostile_actions_in_parallel(sandbox, episode):
    jobs = [(episode, code) for _, code, _ in HOSTILE[:12]] + [(episode, "print(bump(secret))")]
    results = sandbox.run(jobs)
    assert all(r.error_kind == "forbidden" for r, _ in results[:12])
    assert results[-1][0].observation == "42\n"


# --- the kernel layer on its own: allow the dangerous modules and check the OS still contains them.

OS_CFG = CFG.model_copy(update={
    "workers": 1,
    "allowed_imports": DEFAULT_ALLOWED_IMPORTS + ("os", "socket", "subprocess", "ctypes", "signal"),
})
PROJECT = Path(__file__).resolve().parents[2]

OS_CASES = [
    ("read_passwd", "import os\nos.open('/etc/passwd', os.O_RDONLY)", "FileNotFoundError"),
    # Only the interpreter's folders are mounted into the jail (a venv inside the repo is one), never the
    # project's own files.
    ("read_project", f"import os\nos.open({str(PROJECT / 'pyproject.toml')!r}, os.O_RDONLY)", "FileNotFoundError"),
    ("write_system_dir", "import os\nos.open('/usr/lib/pwned', os.O_CREAT | os.O_WRONLY)", "Read-only"),
    # /tmp is absent from the jail, or read-only when the interpreter itself lives under /tmp.
    ("write_tmp", "import os\nos.open('/tmp/pwned', os.O_CREAT | os.O_WRONLY)", "Error:"),
    ("fork_bomb", "import os\nwhile True:\n    os.fork()", "BlockingIOError"),
    ("subprocess", "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'id'])", "Error:"),
    ("network", "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)", "unreachable"),
    ("kill_supervisor", "import os\nos.kill(1, 9)", "PermissionError"),
    ("chroot_escape", "import os\nos.mkdir('x')\nos.chroot('x')", "PermissionError"),
    ("environment", "import os\nassert not os.environ, dict(os.environ)\nraise ValueError('empty')", "empty"),
    ("segfault", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", "SIGSEGV"),
    ("abort", "import os\nos.abort()", "killed by SIGABRT"),
    ("self_kill", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "killed by SIGKILL"),
]


@pytest.fixture(scope="module")
def os_sandbox():
    with Sandbox(OS_CFG) as box:
        report = box.isolation()
        if not (report["filesystem"].startswith("chroot") and report["network"].startswith("off")
                and report["user"].startswith("nobody")):
            pytest.skip(f"kernel isolation not available here: {report}")
        yield box


@pytest.mark.parametrize(("code", "expected"), [c[1:] for c in OS_CASES], ids=[c[0] for c in OS_CASES])
def test_kernel_layer_contains_unguarded_modules(os_sandbox, code, expected):
    [(result, _)] = os_sandbox.run([(os_sandbox.new_state(), code)])
    assert result.error_kind != "none"
    assert expected in result.observation
    assert not os.path.exists("/tmp/pwned")
    [(after, _)] = os_sandbox.run([(os_sandbox.new_state(), "import os\nprint(os.getuid())")])
    assert after.observation == "65534\n"
