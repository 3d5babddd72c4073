"""The stall watchdog's rule on stand-in servers (no model): a process that uses CPU time is making progress
even when ``/slots`` does not answer (llama.cpp's main loop busy with a long prompt batch); an idle one,
while requests wait, is killed after ``stall_timeout_s`` with a message that says why. The real server,
stopped with SIGSTOP, is in ``test_llamacpp.py``."""

from __future__ import annotations

import sys
import time

from agent_runtime.backends.llamacpp_watchdog import Watchdog
from services.processes import HOST, free_port, start

STALL_TIMEOUT_S = 1.5


def stand_in(code: str):
    return start([sys.executable, "-c", code], name="a stand-in server")


def watched_for(child, seconds: float) -> Watchdog:
    """A watchdog of ``child`` (at a port nobody answers on) with one request in flight for ``seconds``."""
    watchdog = Watchdog(child, f"http://{HOST}:{free_port()}", f"stand-in pid {child.pid}", STALL_TIMEOUT_S)
    with watchdog.watch({123: "'question q1 sample 0 step 1' sample 0"}):
        deadline = time.monotonic() + seconds
        while watchdog.stall is None and time.monotonic() < deadline:
            time.sleep(0.05)
    return watchdog


def test_a_process_using_cpu_time_is_not_stalled_though_slots_do_not_answer():
    child = stand_in("while True: pass")
    try:
        watchdog = watched_for(child, 3 * STALL_TIMEOUT_S)
        watchdog.close()
        assert watchdog.stall is None and child.exit_status() is None
    finally:
        child.stop(timeout_s=5)


def test_an_idle_process_while_requests_wait_is_killed_and_named():
    child = stand_in("import time; time.sleep(120)")
    try:
        started = time.monotonic()
        watchdog = watched_for(child, 30 * STALL_TIMEOUT_S)
        watchdog.close()
        assert watchdog.stall is not None and time.monotonic() - started < 20 * STALL_TIMEOUT_S
        assert watchdog.stall.startswith(f"stand-in pid {child.pid} made no progress for ")
        assert "process sleeping, CPU time flat at" in watchdog.stall and "/slots unanswered" in watchdog.stall
        assert "requests in flight: 'question q1 sample 0 step 1' sample 0" in watchdog.stall
        assert child.process.wait(timeout=10) == -9
    finally:
        child.stop(timeout_s=5)


def test_an_idle_server_with_nothing_in_flight_is_left_alone():
    child = stand_in("import time; time.sleep(120)")
    try:
        watchdog = Watchdog(child, f"http://{HOST}:{free_port()}", "stand-in", STALL_TIMEOUT_S)
        time.sleep(3 * STALL_TIMEOUT_S)
        watchdog.close()
        assert watchdog.stall is None and child.exit_status() is None
    finally:
        child.stop(timeout_s=5)
