"""services.processes with real child processes: a free port, the project's environment, dying with the
parent, waiting until ready, the log's end, and stopping a whole tree (grandchildren and orphans too)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest

from services.processes import (
    PARENT_VARIABLE,
    PROJECT_ROOT,
    ChildError,
    free_port,
    marked,
    port_open,
    project_env,
    start,
    stop_all,
)

# A child that asks to die with its parent, then sleeps.
DYING_CHILD = "from services.processes import die_with_parent; die_with_parent(); import time; time.sleep(60)"


def gone(pid: int, within_s: float = 10) -> bool:
    """True when ``pid`` ends (or is only a zombie waiting to be collected) within ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_free_port_has_no_listener_and_can_be_bound():
    port = free_port()
    assert 1024 <= port < 65536 and not port_open(port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert port_open(port)


def test_project_env_puts_the_checkout_first_once_and_keeps_an_explicit_hub_setting():
    env = project_env({"PYTHONPATH": "/x", "HF_HUB_OFFLINE": "0"}, EXTRA="1")
    assert env["PYTHONPATH"] == f"{PROJECT_ROOT}{os.pathsep}/x"
    assert (env["HF_HUB_OFFLINE"], env["TRANSFORMERS_OFFLINE"], env["EXTRA"]) == ("0", "1", "1")
    assert project_env(env) == env  # a child's environment passed on again is not changed
    assert project_env({})["PYTHONPATH"] == str(PROJECT_ROOT)


def test_a_child_dies_with_its_parent(tmp_path):
    # The parent (a child of this test) starts the grandchild, says its pid, and is then SIGKILLed.
    parent = start(python("import sys, time; from services.processes import start\n"
                          f"child = start([sys.executable, '-c', {DYING_CHILD!r}], name='grandchild')\n"
                          "print(child.pid, flush=True); time.sleep(60)"),
                   name="parent", stdout=subprocess.PIPE)
    try:
        grandchild = int(parent.process.stdout.readline())
        assert not gone(grandchild, within_s=0.5)
        parent.process.kill()
        parent.process.wait()
        assert gone(grandchild)
    finally:
        parent.stop(timeout_s=1)


def test_a_child_outlives_the_thread_that_started_it():
    # The kernel's parent-death signal follows the forking thread; start() forks on a thread that stays.
    started = []
    thread = threading.Thread(target=lambda: started.append(start(python(DYING_CHILD), name="child")))
    thread.start()
    thread.join()
    [child] = started
    try:
        time.sleep(1)
        assert child.exit_status() is None
    finally:
        child.stop(timeout_s=1)
    assert child.exit_status() == "was killed by signal 15"


def test_a_child_whose_parent_is_already_gone_exits_at_once():
    env = {**project_env(), PARENT_VARIABLE: "1"}  # pid 1 is not this child's parent: as if it had died
    result = subprocess.run(python(DYING_CHILD), env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and "parent process 1 ended before this one started" in result.stderr


def test_stop_takes_the_grandchildren_that_ignore_sigterm_too():
    code = ("import signal, subprocess, sys, time\n"
            "grandchild = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)'], "
            "stdout=subprocess.PIPE)\n"
            "grandchild.stdout.readline(); print(grandchild.pid, flush=True); time.sleep(60)")
    child = start(python(code), name="child", stdout=subprocess.PIPE)
    grandchild = int(child.process.stdout.readline())
    started = time.monotonic()
    assert child.stop(timeout_s=1) == -signal.SIGTERM
    assert gone(grandchild, within_s=0) and time.monotonic() - started < 30  # ~1 s; it ignores SIGTERM for 60 s


def test_stop_takes_the_orphans_left_in_a_childs_session():
    # The child starts `sleep` and exits at once: the sleep is reparented, out of the child's tree.
    child = start(python("import subprocess; print(subprocess.Popen(['sleep', '60']).pid, flush=True)"),
                  name="child", stdout=subprocess.PIPE, new_session=True)
    orphan = int(child.process.stdout.readline())
    child.process.wait()
    assert not gone(orphan, within_s=0.2)
    child.stop(timeout_s=2)
    assert gone(orphan)


def test_a_child_that_exits_before_it_is_ready_is_one_error_with_its_log_end(tmp_path):
    child = start(python("for i in range(30): print(f'line {i}')\nraise SystemExit(3)"), name="the server",
                  log=tmp_path / "logs" / "server.log")
    with pytest.raises(ChildError, match=r"the server \(pid \d+\) exited with code 3 before it would answer") as caught:
        child.wait_until(lambda: False, timeout_s=60, what="answer", interval_s=0.05)
    assert str(caught.value).endswith("; its log ends:\n" + "\n".join(f"line {i}" for i in range(10, 30)))
    assert child.tail(3) == ["line 27", "line 28", "line 29"]


def test_waiting_stops_at_the_timeout_and_returns_once_ready(tmp_path):
    child = start(python("import time; time.sleep(60)"), name="sleeper", log=tmp_path / "sleeper.log")
    try:
        with pytest.raises(ChildError, match=r"sleeper \(pid \d+\) did not listen within 0 s$"):
            child.wait_until(lambda: False, timeout_s=0.2, what="listen", interval_s=0.05)
        calls = iter([False, False, True])
        assert child.wait_until(lambda: next(calls), timeout_s=10, what="listen", interval_s=0.05) >= 0.1
    finally:
        child.stop(timeout_s=1)


def test_stop_all_kills_the_marked_processes_that_ignore_sigterm():
    token = uuid.uuid4().hex
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"
    children = [start(python(code), name=f"marked {i}", env={**os.environ, "TEST_TOKEN": token},
                      stdout=subprocess.PIPE) for i in range(2)]
    for child in children:
        child.process.stdout.readline()  # its SIGTERM handler is in place
    found = marked("TEST_TOKEN", token)
    assert sorted(process.pid for process in found) == sorted(child.pid for child in children)
    stop_all(found, timeout_s=0.5)
    assert [child.process.wait(timeout=5) for child in children] == [-signal.SIGKILL] * 2
