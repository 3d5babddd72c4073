"""Symbolic equivalence of two math answers with math-verify, under a real time limit.

sympy can run for minutes, or forever, on a short answer (``(99!)!`` asks for the factorial of a
156-digit number). math-verify's own time limit uses ``SIGALRM``, which works only in the main thread,
and Prefect runs tasks in worker threads. So every comparison runs in a worker process: the caller
waits at most ``timeout_s`` for the verdict, and a worker that overruns is killed (and replaced on the
next call), whatever thread the caller is on.

    >>> compare("14/3", "\\frac{14}{3}", timeout_s=5.0)
    <Verdict.EQUAL: 'equal'>

Workers are plain ``python -m evaluation.symbolic`` processes that read one JSON request per line on
stdin and answer one JSON line on stdout. Not ``multiprocessing``: its spawn start method re-imports the
parent's ``__main__`` in the child (for an evaluation shard process, Prefect and the whole task stack),
and fork is unsafe in a process that already runs threads. Up to :data:`POOL_SIZE` workers live for the
life of the process and are reused, so a comparison costs a pipe round trip, not a process start. A
worker dies with its parent (``services.processes.die_with_parent``), even when it is deep in sympy then.
"""

from __future__ import annotations

import atexit
import json
import logging
import re
import select
import signal
import subprocess
import sys
import threading
from enum import Enum

from services.processes import die_with_parent, start

# Workers started at most at once; a caller beyond that waits for one to be free.
POOL_SIZE = 2
# A worker imports sympy and math-verify before its first answer; that is not part of any item's limit.
STARTUP_TIMEOUT_S = 180.0


class Verdict(str, Enum):
    """What a symbolic comparison found."""

    EQUAL = "equal"
    DIFFERENT = "different"
    UNPARSED = "unparsed"  # one side is not a math object math-verify can read
    TIMEOUT = "timeout"  # no verdict within the time limit


class SymbolicWorkerError(RuntimeError):
    """A worker process that could not start or died without answering."""


def compare(pred: str, gold: str, timeout_s: float) -> Verdict:
    """math-verify's verdict on ``pred`` against ``gold``, or ``Verdict.TIMEOUT`` after ``timeout_s``.

    Safe to call from any thread; at most :data:`POOL_SIZE` comparisons run at once.
    """
    return _POOL.compare(pred, gold, timeout_s)


# --------------------------------------------------------------------------------------------- the pool


class _Worker:
    """One worker process and its pipes."""

    def __init__(self) -> None:
        self.child = start(
            [sys.executable, "-m", "evaluation.symbolic"], name="the math-verify worker", stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, bufsize=0,  # unbuffered: select() then sees exactly what is unread
            new_session=True,  # Ctrl+C in the terminal is the parent's to handle
        )
        self.process = self.child.process
        try:
            ready = self._read_line(STARTUP_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        if ready != {"ready": True}:
            self.stop()
            raise SymbolicWorkerError(f"the math-verify worker did not start within {STARTUP_TIMEOUT_S:.0f} s")

    def ask(self, pred: str, gold: str, timeout_s: float) -> Verdict:
        try:
            self.process.stdin.write((json.dumps({"pred": pred, "gold": gold}) + "\n").encode())
            self.process.stdin.flush()
        except BrokenPipeError as exc:
            raise SymbolicWorkerError("the math-verify worker died") from exc
        reply = self._read_line(timeout_s)
        return Verdict.TIMEOUT if reply is None else Verdict(reply["verdict"])

    def _read_line(self, timeout_s: float) -> dict | None:
        """The next JSON line from the worker, or None when none arrives within ``timeout_s``."""
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = self.process.stdout.readline()
        if not line:
            raise SymbolicWorkerError(f"the math-verify worker exited (code {self.process.wait()})")
        return json.loads(line)

    def stop(self) -> None:
        self.child.stop(signum=signal.SIGKILL)  # it may be deep in sympy: no use asking it to end
        for pipe in (self.process.stdin, self.process.stdout):
            pipe.close()


class _Pool:
    """Up to ``size`` reusable workers, started on first use."""

    def __init__(self, size: int) -> None:
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()

    def compare(self, pred: str, gold: str, timeout_s: float) -> Verdict:
        with self._slots:
            worker = self._take()
            try:
                verdict = worker.ask(pred, gold, timeout_s)
            except BaseException:
                self._discard(worker)
                raise
            if verdict is Verdict.TIMEOUT:
                self._discard(worker)  # still busy in sympy: the only way to stop it is to kill it
            else:
                with self._lock:
                    self._idle.append(worker)
            return verdict

    def _take(self) -> _Worker:
        while True:
            with self._lock:
                worker = self._idle.pop() if self._idle else None
            if worker is None:
                break
            if worker.process.poll() is None:
                return worker
            self._discard(worker)  # died while idle (e.g. killed from outside)
        worker = _Worker()  # forked by services.processes' one long-lived thread, so it dies with the process
        with self._lock:
            self._all.add(worker)
        return worker

    def _discard(self, worker: _Worker) -> None:
        with self._lock:
            self._all.discard(worker)
        worker.stop()

    def close(self) -> None:
        """Stop every worker (registered to run at exit)."""
        with self._lock:
            workers, self._all, self._idle = list(self._all), set(), []
        for worker in workers:
            worker.stop()


_POOL = _Pool(POOL_SIZE)
atexit.register(_POOL.close)


# ------------------------------------------------------------------------------------------- the worker

# Words that occur in math answers; any other word of 3+ letters means the answer is prose.
_MATH_WORDS = {
    "sqrt", "frac", "dfrac", "tfrac", "pi", "infty", "inf", "sin", "cos", "tan", "log", "ln", "exp",
    "cup", "cap", "left", "right", "cdot", "times", "circ", "text", "and", "or", "mbox",
}


def looks_like_prose(text: str) -> bool:
    """True when ``text`` has a lowercase word of 3+ letters outside LaTeX commands and known functions.

    Commands with a word argument (``\\begin{pmatrix}``, ``\\text{ feet}``) are LaTeX; capitalised runs
    like ``ABC`` name points in geometry answers.
    """
    bare = re.sub(r"\\[A-Za-z]+(?:\{[A-Za-z* ]*\})?", " ", text)
    words = re.findall(r"\b[A-Za-z]*[a-z][A-Za-z]*\b", bare)
    return any(len(w) >= 3 and w.lower() not in _MATH_WORDS for w in words)


def plain_to_latex(text: str) -> str:
    """Spell plain-text math the way the LaTeX parser expects ("pi" -> "\\pi", "oo" -> "\\infty")."""
    text = re.sub(r"(?<!\\)\bpi\b", r"\\pi", text)
    text = re.sub(r"(?<!\\)\b(?:oo|inf|infinity)\b", r"\\infty", text)
    return re.sub(r"\s+U\s+", r" \\cup ", text)


def math_verify_verdict(pred: str, gold: str) -> Verdict:
    """math-verify's verdict, computed in this process with no time limit (the caller enforces one)."""
    from math_verify import parse, verify

    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    if not gold_parsed:
        return Verdict.UNPARSED
    if looks_like_prose(pred):
        # Prose ("the total is 42 apples") must not be read as LaTeX products of letters.
        pred_parsed = parse(pred, parsing_timeout=None)
    else:
        pred_parsed = parse(f"${plain_to_latex(pred)}$", parsing_timeout=None) or parse(pred, parsing_timeout=None)
    if not pred_parsed:
        return Verdict.UNPARSED
    return Verdict.EQUAL if verify(gold_parsed, pred_parsed, timeout_seconds=None) else Verdict.DIFFERENT


def serve() -> None:
    """The worker loop: one ``{"pred", "gold"}`` line in, one ``{"verdict"}`` line out, until end of input."""
    die_with_parent(signal.SIGKILL)  # sympy would not get to a SIGTERM handler
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the replies

    # math-verify warns once that its timeouts are disabled; here the parent enforces the limit.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401  (import sympy and the LaTeX parser before saying ready)

    stdout.write(b'{"ready": true}\n')
    stdout.flush()
    for line in stdin:
        request = json.loads(line)
        try:
            verdict = math_verify_verdict(request["pred"], request["gold"])
        except Exception:  # noqa: BLE001 - a sympy failure on odd input is no verdict, not a dead worker
            verdict = Verdict.UNPARSED
        stdout.write((json.dumps({"verdict": verdict.value}) + "\n").encode())
        stdout.flush()


if __name__ == "__main__":
    serve()
