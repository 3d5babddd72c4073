"""The math-verify worker pool: verdicts from any thread, dead workers replaced, none left behind."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

from evaluation import symbolic
from evaluation.symbolic import Verdict, compare


def test_verdicts_from_many_threads_at_once():
    pairs = [("14/3", "\\frac{14}{3}", Verdict.EQUAL), ("4.6667", "\\frac{14}{3}", Verdict.DIFFERENT),
             ("(x-1)(x+1)", "x^2 - 1", Verdict.EQUAL), ("6-5i", "6", Verdict.DIFFERENT),
             ("Evelyn", "\\text{Evelyn}", Verdict.UNPARSED)] * 3
    with ThreadPoolExecutor(max_workers=4) as threads:
        verdicts = list(threads.map(lambda p: compare(p[0], p[1], timeout_s=30.0), pairs))
    assert verdicts == [expected for _, _, expected in pairs]
    assert len(symbolic._POOL._all) <= symbolic.POOL_SIZE


def test_a_worker_killed_while_idle_is_replaced():
    assert compare("1/2", "0.5", timeout_s=30.0) is Verdict.EQUAL
    idle = list(symbolic._POOL._idle)
    assert idle
    for worker in idle:
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait()
    assert compare("1/2", "0.5", timeout_s=30.0) is Verdict.EQUAL
    assert all(w.process.poll() is None for w in symbolic._POOL._all)
