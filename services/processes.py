"""Child processes: start one with the project's environment, wait until it is ready, read the end of its
log, stop it together with everything below it.

    child = start([sys.executable, "-m", "some.server", "--port", str(port)], name="some server", log=path)
    try:
        child.wait_until(lambda: port_open(port), timeout_s=60, what=f"listen on port {port}")
        ...
    finally:
        child.stop()

Dying with the parent: a Python child that must not outlive this process calls :func:`die_with_parent`
first thing (Linux ``PR_SET_PDEATHSIG``), so a stage killed with ``kill -9`` leaves no server behind.
The kernel sends that signal when the *thread* that forked the child exits, and Prefect's task threads
come and go, so every child is forked by one thread that lives as long as the process (``_starter``).
``start`` also tells the child which process its parent is: a child whose parent died before it asked the
kernel exits at once instead of running on as an orphan.

Stopping: :meth:`Child.stop` signals the child, waits, kills it if it is still there, then does the same
to its descendants (found through psutil while the child is still their parent) and, for a child in a
session of its own, to every process left in that session. :func:`stop_all` does the signal-wait-kill
for any processes, e.g. those :func:`marked` finds by a variable in their environment (the stage
supervisor's reaper).
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

HOST = "127.0.0.1"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
PARENT_VARIABLE = "DISTILLERY_PARENT_PID"  # set by start(), read (and removed) by die_with_parent()
PR_SET_PDEATHSIG = 1
TAIL_BYTES = 64 * 1024  # how much of a log's end is read for its last lines


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that nobody listens on right now (bound, then released for a child to take)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = HOST) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def project_env(environ: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``environ`` (default: this process's) plus ``extra``, with this checkout first on ``PYTHONPATH`` (a
    child runs ``python -m flows.cli`` and the like, installed or not) and the model hubs offline unless
    the environment says otherwise (nothing here downloads a model)."""
    env = {**(os.environ if environ is None else environ), **extra}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    paths = [path for path in env.get("PYTHONPATH", "").split(os.pathsep) if path]
    if paths[:1] != [str(PROJECT_ROOT)]:
        env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *paths])
    return env


def relay(stream, out, hold: Callable[[str], bool] = lambda line: False) -> list[str]:
    """Copy ``stream`` (a child's stderr, bytes) to ``out`` as it arrives, whole lines at a time (a progress
    bar's ``\\r`` updates pass as they come), and return the lines ``hold`` kept back instead."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending, held = "", []

    def emit(lines: str) -> None:
        for line in lines.splitlines(keepends=True):
            if hold(line):
                held.append(line)
            else:
                out.write(line)
        out.flush()

    for chunk in iter(lambda: stream.read1(65536), b""):
        pending += decoder.decode(chunk)
        cut = max(pending.rfind("\n"), pending.rfind("\r")) + 1
        complete, pending = pending[:cut], pending[cut:]
        emit(complete)
    emit(pending + decoder.decode(b"", final=True))
    return held


def tail(log: Path, lines: int = 20) -> list[str]:
    """The last ``lines`` lines of the file ``log`` (none when it does not exist)."""
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - TAIL_BYTES))
            text = handle.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    return text.strip().splitlines()[-lines:]


class ChildError(RuntimeError):
    """A child exited, or was not ready in time; the message ends with the last lines of its log."""


@dataclass(eq=False)
class Child:
    """A started child process, its name in messages ("the llama.cpp server") and the file its output
    goes to. ``session``: it leads a session of its own (``start(new_session=True)``)."""

    process: subprocess.Popen
    name: str
    log: Path | None = None
    session: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit_status(self) -> str | None:
        """How it ended ("exited with code 1", "was killed by signal 9"), or None while it runs."""
        code = self.process.poll()
        if code is None:
            return None
        return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"

    def tail(self, lines: int = 20) -> list[str]:
        """The last ``lines`` lines of its log (none without a log)."""
        return [] if self.log is None else tail(self.log, lines)

    def ended(self, lines: int = 5) -> str | None:
        """None while it runs; else "<name> (pid N) <how it ended>; its last log lines: a | b"."""
        status = self.exit_status()
        if status is None:
            return None
        log = ("; its last log lines: " + " | ".join(self.tail(lines))) if self.tail(lines) else ""
        return f"{self.name} (pid {self.pid}) {status}{log}"

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.5) -> float:
        """Call ``ready()`` every ``interval_s`` until it returns true; the seconds waited. A ChildError when
        the child exits first or ``timeout_s`` passes; ``what`` is what it was waited for, as in "the
        server did not <what> within 60 s" ("answer http://127.0.0.1:8080/health")."""
        started = time.monotonic()
        while not ready():
            status = self.exit_status()
            if status is not None:
                raise ChildError(f"{self.name} (pid {self.pid}) {status} before it would {what}{self.log_end()}")
            if time.monotonic() - started > timeout_s:
                raise ChildError(f"{self.name} (pid {self.pid}) did not {what} within {timeout_s:.0f} s"
                                 f"{self.log_end()}")
            time.sleep(interval_s)
        return time.monotonic() - started

    def log_end(self, lines: int = 20) -> str:
        """``"; its log ends:\\n<lines>"``, the end of an error message (empty without a log or output)."""
        tail = self.tail(lines)
        return ("; its log ends:\n" + "\n".join(tail)) if tail else ""

    def stop(self, timeout_s: float = 10, signum: int = signal.SIGTERM) -> int:
        """Stop the child and every process below it: ``signum`` to the child, SIGKILL if it is still
        there after ``timeout_s``; then the same (within what is left of ``timeout_s``) for the processes
        it left behind. Its exit code."""
        deadline = time.monotonic() + timeout_s
        below = self._below()
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Processes in its session that had left the tree (orphans, reparented to init) are found now too.
        left = {process.pid: process for process in [*below, *self._below()]}
        stop_all(left.values(), max(0.0, deadline - time.monotonic()), signum)
        return self.process.returncode

    def _below(self) -> list[psutil.Process]:
        """Its descendants while it runs, and the other processes of its session if it leads one."""
        found: list[psutil.Process] = []
        if self.process.poll() is None:  # not reaped, so its pid is still its own
            with contextlib.suppress(psutil.NoSuchProcess):
                found += psutil.Process(self.pid).children(recursive=True)
        if self.session:
            # The kernel does not reuse a pid while a session of that id has members: no stranger is hit.
            found += [process for process in psutil.process_iter()
                      if process.pid != self.pid and _session(process.pid) == self.pid]
        return found


def start(command: list[str], *, name: str, log: Path | None = None, env: Mapping[str, str] | None = None,
          new_session: bool = False, **popen: Any) -> Child:
    """Start ``command`` with the project's environment (``project_env(env)``) and this process named as its
    parent (see ``die_with_parent``). Its stdout and stderr are appended to ``log`` when one is given; other
    ``subprocess.Popen`` arguments (``stdin``, ``stdout``, ``cwd``, ``bufsize``) pass through.
    ``new_session``: a session of its own, so a Ctrl+C in the terminal does not reach it (its parent
    decides), and ``stop`` reaches every process it leaves in that session."""
    child_env = project_env(env)
    child_env[PARENT_VARIABLE] = str(os.getpid())
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)

    def launch() -> subprocess.Popen:
        if log is None:
            return subprocess.Popen(command, env=child_env, start_new_session=new_session, **popen)
        with open(log, "ab") as out:  # the child keeps its own descriptor
            return subprocess.Popen(command, env=child_env, start_new_session=new_session, stdout=out,
                                    stderr=subprocess.STDOUT, **popen)

    return Child(_starter().submit(launch).result(), name, log, new_session)


_starter_lock = threading.Lock()
_starter_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid that made it, the one-thread pool)


def _starter() -> ThreadPoolExecutor:
    """The one thread that forks every child of this process (see the module docstring); a forked copy
    of this process makes its own, since the thread is not copied."""
    global _starter_pool
    with _starter_lock:
        if _starter_pool is None or _starter_pool[0] != os.getpid():
            _starter_pool = os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="child-starter")
        return _starter_pool[1]


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """In a child: have Linux send ``signum`` to this process when its parent exits (a no-op elsewhere).
    Call it first thing. Started by ``start``, the child exits at once if its parent is already gone."""
    parent = os.environ.pop(PARENT_VARIABLE, None)  # this process's own children get their own
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if parent is not None and os.getppid() != int(parent):  # it died before the prctl above
        raise SystemExit(f"{sys.argv[0]}: parent process {parent} ended before this one started")


def marked(variable: str, value: str) -> list[psutil.Process]:
    """The live processes (other than this one) whose environment sets ``variable`` to ``value``; those
    of other users, whose environment cannot be read, are not among them."""
    found = []
    for process in psutil.process_iter(["environ"]):
        environ = process.info["environ"]  # None when access is denied (or a zombie)
        if environ and environ.get(variable) == value and process.pid != os.getpid():
            found.append(process)
    return found


def stop_all(processes: Iterable[psutil.Process], timeout_s: float, signum: int = signal.SIGTERM) -> None:
    """Send ``signum`` to each of ``processes``, wait up to ``timeout_s`` for them to end, SIGKILL the rest.
    psutil makes sure each is still the process it was (a reused pid is left alone)."""
    processes = list(processes)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)
    alive = _wait_gone(processes, timeout_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    _wait_gone(alive, 5.0)


def _wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until none of ``processes`` runs or ``timeout_s`` passes; those still running. A zombie counts
    as gone: it has ended and only waits for its parent (or init) to collect it."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [process for process in processes if _running(process)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:  # gone
        return None
