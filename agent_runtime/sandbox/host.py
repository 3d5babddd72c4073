"""Sandboxed Python executor for the agent's actions (the "code interpreter" of CodeAct): the host side.

    with Sandbox(SandboxConfig(), search=retriever_text_search) as sandbox:
        state = sandbox.new_state()
        [(result, state)] = sandbox.run([(state, "x = 6 * 7\\nprint(x)")])
        [(result, state)] = sandbox.run([(state, "final_answer(x)")])   # result.is_final, "42"

From the shell: ``distillery sandbox -c CODE`` or ``-f FILE`` (a line ``#---`` separates the
steps of one episode) calls ``run_actions(split_actions(text), cfg)``.

How it is built (details in the modules named, all in ``agent_runtime/sandbox/``):
- ``Sandbox`` here, in the engine's process, drives ``cfg.workers`` worker processes over pipes
  with the frames of ``protocol.py``.
- Each worker (``worker.py``) is a warm interpreter with the allowed modules preloaded that
  forks one fresh, confined process per action, so a crash, a hang or a limit hit costs one
  action and never the worker, the episode or the run.
- Kernel isolation where the OS allows (``isolation.py``): network, mount and pid namespaces,
  a chroot jail on a private tmpfs, uid nobody with no_new_privs, rlimits on CPU time, address
  space, file size, open files and processes, an empty environment, a wall-clock limit, bounded
  output.  ``isolation()`` says what was applied on this machine.
- A Python-level guard (``guard.py``): an import allowlist and AST check before running,
  restricted builtins, read-only module proxies.  ``action.py`` is what runs inside the
  action's process: prints become the observation, exceptions an "Error: ..." line.
- Variables persist across the steps of an episode as an opaque ``EpisodeState``
  (``state.py``); the host never unpickles it.  ``run`` never mutates its inputs, so SAG
  can run N candidates from one state and keep the winner's new state.
- ``web_search`` inside the code is relayed by the worker to the ``search`` callable given here:
  one retriever in the host's memory, not one per worker.

What the code sees: ``print`` output is the observation (cut beyond ``max_output_chars`` with a
note); ``final_answer(x)`` stops the action and sets ``is_final``/``final_answer=str(x)``;
imports are limited to ``allowed_imports`` (default: ``DEFAULT_ALLOWED_IMPORTS``); attributes
starting with "_" (except a few harmless dunders) are refused; ``open`` works inside a fresh,
empty working directory, so files do not outlive their action; ``random`` and ``numpy.random``
are seeded with 0 at the start of every action.  Linux only (rlimits, namespaces, /proc).
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import typing
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent_runtime.execution import ErrorKind, ExecResult
from agent_runtime.sandbox.protocol import FrameBuffer, ProtocolError, encode_frame, write_all
from common.scratch import scratch_dir

# The paper's list (smolagents' CodeAct defaults plus numpy and sympy) and harmless pure
# standard modules an LLM commonly reaches for in math and QA code.
DEFAULT_ALLOWED_IMPORTS: tuple[str, ...] = (
    "collections", "datetime", "itertools", "math", "queue", "random", "re", "stat", "statistics",
    "time", "unicodedata", "numpy", "sympy",
    "fractions", "decimal", "functools", "heapq", "bisect", "string", "cmath", "operator", "copy",
    "json", "typing", "dataclasses", "textwrap",
)
MAX_CODE_CHARS = 100_000
MAX_SEARCH_CHARS = 1_000_000  # a search result beyond this is cut (frames to the worker stay small)
STARTUP_TIMEOUT_S = 120.0  # preloading sympy on a loaded 2-core machine can take several seconds
BACKSTOP_GRACE_S = 10.0  # the worker enforces the wall clock; the host steps in only if it does not
MAX_STARTUP_FAILURES = 3
_ERROR_KINDS = frozenset(typing.get_args(ErrorKind))
# -P: the current directory is not importable.  The packages are registered without running
# their __init__.py: agent_runtime/__init__.py may import heavy modules, and
# agent_runtime/sandbox/__init__.py imports this host side (pydantic, the engine's result type),
# none of which the worker needs.  argv[1] is the directory of the sandbox package.
_BOOTSTRAP = (
    "import os, sys, types\n"
    "sandbox_dir = sys.argv[1]\n"
    "for name, path in [('agent_runtime', os.path.dirname(sandbox_dir)),\n"
    "                   ('agent_runtime.sandbox', sandbox_dir)]:\n"
    "    package = types.ModuleType(name)\n"
    "    package.__path__ = [path]\n"
    "    sys.modules[name] = package\n"
    "from agent_runtime.sandbox.worker import main\n"
    "main(sys.argv[2])\n"
)
# Not secrets: one BLAS thread keeps the address space small, a fixed hash seed keeps set and
# dict iteration identical on every worker, UTF-8 mode fixes the file encoding.
_WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONHASHSEED": "0", "PYTHONUTF8": "1"}


class SandboxConfig(BaseModel):
    """Limits and policy of the sandboxed executor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: int = Field(2, ge=1, description="worker processes, i.e. actions run in parallel")
    cpu_time_s: int = Field(10, ge=1, description="CPU time limit per action (RLIMIT_CPU)")
    wall_time_s: float = Field(20.0, gt=0, description="wall-clock limit per action, then it is killed")
    memory_mb: int = Field(1024, ge=256, description="address-space limit per action process (RLIMIT_AS), MB")
    file_size_mb: int = Field(8, ge=1, description="largest file an action may write (RLIMIT_FSIZE), MB")
    max_output_chars: int = Field(
        4000, ge=100, description="printed output kept in the observation; the rest is cut with a note")
    allowed_imports: tuple[str, ...] = Field(
        DEFAULT_ALLOWED_IMPORTS, description="top-level modules the code may import")
    network: Literal["auto", "namespace", "none"] = Field(
        "auto", description="auto: no network where the OS allows; namespace: require it; none: leave it on")

    @field_validator("allowed_imports")
    @classmethod
    def _top_level_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        bad = [n for n in names if not n.isidentifier() or n.startswith("_")]
        if bad:
            raise ValueError(f"allowed_imports must be public top-level module names, got {bad}")
        return names


@dataclass(frozen=True)
class EpisodeState:
    """The variables of an episode between two steps: opaque bytes only the workers read.

    Immutable; ``Sandbox.new_state()`` makes the empty one.  ``variables`` lists the names kept.
    """

    payload: bytes = field(default=b"", repr=False)
    variables: tuple[str, ...] = ()


@dataclass(eq=False)
class _Worker:
    proc: subprocess.Popen
    frames: FrameBuffer
    deadline: float  # start-up deadline, then the current action's backstop
    ready: bool = False
    job: int | None = None
    started: float = 0.0
    tool_calls: int = 0


def _error_result(kind: ErrorKind, message: str, duration_s: float = 0.0) -> ExecResult:
    return ExecResult(observation="Error: " + message, error_kind=kind, error=message, duration_s=duration_s)


def _kill(worker: _Worker) -> None:
    try:
        os.killpg(worker.proc.pid, signal.SIGKILL)  # the worker, its pid-1 zygote and any action process
    except ProcessLookupError:
        pass
    worker.proc.wait()
    for pipe in (worker.proc.stdin, worker.proc.stdout):
        pipe.close()


def _shutdown(workers: list[_Worker], root: str) -> None:
    """Close every worker (politely first: EOF on stdin) and delete the sandbox directory."""
    for worker in workers:
        try:
            worker.proc.stdin.close()
        except OSError:
            pass
    deadline = time.monotonic() + 2.0
    for worker in workers:
        try:
            worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _kill(worker)
    workers.clear()
    shutil.rmtree(root, ignore_errors=True)


class Sandbox:
    """Runs (state, code) jobs in confined worker processes.  Not re-entrant: ``run`` calls from
    several threads are serialised."""

    def __init__(self, cfg: SandboxConfig, search: Callable[[str], str] | None = None):
        self.cfg = cfg
        self._search = search
        self._lock = threading.Lock()
        self._spawned = 0
        self._startup_failures = 0
        self._isolation: dict[str, str] = {}
        self._jobs: list[tuple[EpisodeState, str]] = []  # the batch `run` is working on
        self._results: list = []
        self._root = tempfile.mkdtemp(prefix="sandbox-", dir=scratch_dir())  # the run's: gone if it is killed
        os.chmod(self._root, 0o711)  # the action processes run as nobody and must reach their directory
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._root)
        try:
            self._workers.extend(self._spawn() for _ in range(cfg.workers))
            while not all(w.ready for w in self._workers):
                self._poll()
        except BaseException:
            self.close()
            raise

    # -- public API ----------------------------------------------------------------------------

    @property
    def search(self) -> Callable[[str], str] | None:
        """The host-side callable ``web_search`` is relayed to (None: no retrieval)."""
        return self._search

    def new_state(self) -> EpisodeState:
        """The state of a new episode: no variables."""
        return EpisodeState()

    def run(self, jobs: list[tuple[EpisodeState, str]]) -> list[tuple[ExecResult, EpisodeState]]:
        """Run each (state, code) job on its own copy of ``state``, in parallel over the workers.

        Results come back in job order.  Inputs are never mutated.  A failed job returns its input
        state and an ExecResult whose ``error_kind`` is one of execution, timeout, memory,
        forbidden or crash; the observation then says what went wrong.
        """
        for index, job in enumerate(jobs):
            if not (isinstance(job, (tuple, list)) and len(job) == 2 and isinstance(job[0], EpisodeState)
                    and isinstance(job[1], str)):
                raise TypeError(f"job {index} must be (EpisodeState, str), got {job!r:.200}")
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("this Sandbox is closed")
            self._jobs, self._results = list(jobs), [None] * len(jobs)
            queue = list(range(len(jobs)))[::-1]
            try:
                while queue or any(w.job is not None for w in self._workers):
                    for worker in self._workers:
                        if queue and worker.ready and worker.job is None:
                            self._dispatch(worker, queue.pop())
                    self._poll()  # returns at once when no worker is busy or starting
                return self._results
            finally:
                self._jobs, self._results = [], []

    def isolation(self) -> dict[str, str]:
        """What confinement was applied on this machine, one line per aspect."""
        search = ("relayed to the host's search callable" if self._search
                  else "not available (no search callable)")
        return {**self._isolation, "workers": f"{self.cfg.workers} worker processes", "web_search": search}

    def close(self) -> None:
        """Stop the workers and delete their directories.  Idempotent."""
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- workers -------------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        self._spawned += 1
        jail_dir = os.path.join(self._root, f"worker-{self._spawned}")
        os.mkdir(jail_dir, 0o711)
        cfg = {**self.cfg.model_dump(), "allowed_imports": list(self.cfg.allowed_imports),
               "has_search": self._search is not None, "jail_dir": jail_dir}
        sandbox_dir = os.path.dirname(os.path.abspath(__file__))
        proc = subprocess.Popen(
            [sys.executable, "-s", "-P", "-c", _BOOTSTRAP, sandbox_dir, json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_WORKER_ENV,
            cwd=jail_dir, start_new_session=True, close_fds=True, bufsize=0,
        )
        return _Worker(proc=proc, frames=FrameBuffer(), deadline=time.monotonic() + STARTUP_TIMEOUT_S)

    def _fail_job(self, worker: _Worker, kind: ErrorKind, message: str) -> None:
        """Give ``worker``'s job an error result; the job keeps its input state."""
        index, duration = worker.job, time.monotonic() - worker.started
        worker.job, worker.deadline = None, math.inf
        self._results[index] = (_error_result(kind, message, duration), self._jobs[index][0])

    def _replace(self, worker: _Worker, reason: str) -> None:
        """Kill ``worker``, fail its job (if any) with a crash, start a fresh one in its slot."""
        if worker.job is not None:
            message = f"the sandbox worker failed ({reason}); the action's effects were discarded"
            self._fail_job(worker, "crash", message)
        _kill(worker)
        if not worker.ready:
            self._startup_failures += 1
            if self._startup_failures > MAX_STARTUP_FAILURES or not self._isolation:
                self.close()  # a sandbox that cannot start workers is unusable: say why, once
                raise RuntimeError(f"sandbox worker failed to start: {reason}")
        self._workers[self._workers.index(worker)] = self._spawn()

    def _dispatch(self, worker: _Worker, index: int) -> None:
        state, code = self._jobs[index]
        if len(code) > MAX_CODE_CHARS:
            message = f"the action is too long ({len(code)} characters, limit {MAX_CODE_CHARS})"
            self._results[index] = (_error_result("execution", message), state)
            return
        worker.job, worker.tool_calls, worker.started = index, 0, time.monotonic()
        worker.deadline = worker.started + self.cfg.wall_time_s + BACKSTOP_GRACE_S
        self._send(worker, {"op": "run", "code": code}, state.payload)

    def _send(self, worker: _Worker, header: dict, blob: bytes) -> None:
        try:
            write_all(worker.proc.stdin.fileno(), encode_frame(header, blob))
        except OSError as exc:  # the worker died; reading its pipe would show EOF too
            self._replace(worker, f"cannot write to it: {exc}")

    def _poll(self) -> None:
        """Wait for frames from busy or starting workers (until the nearest deadline) and handle them."""
        watched = [w for w in self._workers if w.job is not None or not w.ready]
        if not watched:
            return
        timeout = max(0.0, min(w.deadline for w in watched) - time.monotonic())
        by_fd = {w.proc.stdout.fileno(): w for w in watched}
        readable, _, _ = select.select(list(by_fd), [], [], timeout)
        for fd in readable:
            self._read(by_fd[fd])
        now = time.monotonic()
        for worker in watched:
            if worker in self._workers and worker.deadline < now:
                if worker.job is not None:
                    message = ("TimeoutError: the action exceeded the wall-clock limit of "
                               f"{self.cfg.wall_time_s} s; its worker stopped responding and was restarted")
                    self._fail_job(worker, "timeout", message)
                self._replace(worker, "no answer before the deadline")

    def _read(self, worker: _Worker) -> None:
        chunk = os.read(worker.proc.stdout.fileno(), 1 << 20)
        if not chunk:
            return self._replace(worker, "the worker process exited")
        try:
            frames = worker.frames.feed(chunk)
        except ProtocolError as exc:
            return self._replace(worker, f"protocol error: {exc}")
        for header, blob in frames:
            op = header["op"]
            if op == "ready":
                worker.ready, worker.deadline, self._startup_failures = True, math.inf, 0
                self._isolation = self._isolation or dict(header["isolation"])
            elif op == "fatal":
                return self._replace(worker, str(header.get("error")))
            elif op == "search" and worker.job is not None:
                self._answer_search(worker, header.get("query"))
            elif op == "result" and worker.job is not None:
                self._finish(worker, header, blob)

    def _answer_search(self, worker: _Worker, query: object) -> None:
        worker.tool_calls += 1
        started = time.monotonic()
        try:
            if self._search is None:
                raise RuntimeError("no search tool is configured")
            text = self._search(str(query))
            if not isinstance(text, str):
                raise TypeError(f"the search callable returned {type(text).__name__}, not str")
            reply = {"op": "search_result", "result": text[:MAX_SEARCH_CHARS]}
        except Exception as exc:  # noqa: BLE001 - the retriever's failure is the action's error, not the run's
            reply = {"op": "search_error", "error": f"{type(exc).__name__}: {exc}"}
        worker.deadline += time.monotonic() - started
        self._send(worker, reply, b"")

    def _finish(self, worker: _Worker, header: dict, blob: bytes) -> None:
        kind = header.get("error_kind")
        if kind not in _ERROR_KINDS or not isinstance(header.get("observation"), str):
            return self._fail_job(worker, "crash", "the sandbox worker sent a malformed result")
        index, duration = worker.job, time.monotonic() - worker.started
        worker.job, worker.deadline = None, math.inf
        state = self._jobs[index][0]
        final = header.get("final_answer")
        result = ExecResult(
            observation=header["observation"], error_kind=kind,
            error=None if header.get("error") is None else str(header["error"]),
            is_final=bool(header.get("is_final")), final_answer=None if final is None else str(final),
            tool_calls=worker.tool_calls, duration_s=duration,
        )
        if header.get("state_changed"):
            state = EpisodeState(payload=blob, variables=tuple(map(str, header.get("variables", ()))))
        self._results[index] = (result, state)


def split_actions(text: str) -> list[str]:
    """Split a script into the actions of one episode at lines reading ``#---``; drop empty ones."""
    actions, current = [], []
    for line in text.splitlines():
        if line.strip() == "#---":
            actions.append("\n".join(current))
            current = []
        else:
            current.append(line)
    actions.append("\n".join(current))
    return [action.strip("\n") for action in actions if action.strip()]


def run_actions(
    actions: list[str], cfg: SandboxConfig, search: Callable[[str], str] | None = None,
) -> list[ExecResult]:
    """Run ``actions`` as consecutive steps of one episode; stop after the step that gives a final answer."""
    results = []
    with Sandbox(cfg, search) as sandbox:
        state = sandbox.new_state()
        for code in actions:
            [(result, state)] = sandbox.run([(state, code)])
            results.append(result)
            if result.is_final:
                break
    return results
