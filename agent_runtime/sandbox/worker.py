"""Sandbox worker process: a warm "zygote" that forks one short-lived process per action.

``Sandbox`` (``host.py``) starts it as ``python -s -P -c BOOTSTRAP <sandbox package dir> <config json>``
with an empty environment; host and worker speak frames (``protocol.py``) over stdin/stdout.

Start-up, once per worker:
1. enter new namespaces (net + mount + pid as root) and fork, so the zygote is pid 1 of its pid
   namespace: when it dies, the kernel kills everything it started;
2. import the allowed modules once (sympy alone takes about a second), deny the libraries' escape
   hatches, route their string evaluators through the static check, clear the environment;
3. build the chroot jail; probe that the per-action privilege drop and limits really apply;
4. send "ready" with what was applied.

Then, for each "run" frame, fork a child that drops to nobody and sets the rlimits
(``isolation.confine_action_process``), then restores the episode state, checks and runs the
code, saves the new state and reports back (``action.run_action``).  The zygote relays
``web_search`` requests to the host, enforces the wall-clock limit and turns a killed or crashed
child into a result.  A fresh process per action means nothing an action does (monkeypatching a
module, reseeding the RNG, leaking memory, crashing) reaches the next one, and the zygote itself
never parses, runs or unpickles anything from the model.
"""

from __future__ import annotations

import collections
import gc
import importlib
import json
import os
import select
import shutil
import signal
import socket
import time
import traceback
from typing import NoReturn

from agent_runtime.sandbox import isolation as osi
from agent_runtime.sandbox.action import run_action
from agent_runtime.sandbox.guard import ImportPolicy, patch_libraries
from agent_runtime.sandbox.protocol import Channel, FrameBuffer, ProtocolError, encode_frame, write_all

EXIT_MEMORY = 86  # the action process ran out of memory outside user code
EXIT_FAILED = 87  # the action process could not set itself up or report
PROBE_FORK_ALLOWED = 10
CHILD_EXIT_GRACE_S = 2.0
# Imported lazily on first use; importing them once in the zygote saves every action the time
# (numpy.random alone is ~25 ms) and spares the C-level import path (see guarded_import).
_PRELOAD = ("_strptime", "numpy.random", "numpy.linalg", "numpy.fft", "numpy.polynomial")


def _child_main(sock: socket.socket, work_dir: str, code: str, blob: bytes, zygote: Zygote) -> NoReturn:
    status = EXIT_FAILED
    try:
        osi.confine_action_process(work_dir, zygote.drop_uid, zygote.cfg, sock.fileno())
        channel = Channel(sock)
        header, new_blob = run_action(code, blob, zygote.cfg, zygote.policy, channel, work_dir)
        channel.send(header, new_blob)
        status = 0
    except MemoryError:
        status = EXIT_MEMORY
    except BaseException as exc:  # noqa: BLE001 - report why, then exit with EXIT_FAILED
        try:
            sock.sendall(encode_frame({"op": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]}))
        except BaseException:  # noqa: BLE001, S110 - the socket may be gone too; the exit code says enough
            pass
    finally:
        os._exit(status)


# ------------------------------------------------------------------ the zygote


def _failure(kind: str, message: str) -> dict:
    return {"op": "result", "observation": "Error: " + message, "error_kind": kind, "error": message,
            "is_final": False, "final_answer": None, "state_changed": False, "variables": []}


class Zygote:
    """The long-lived worker process: prepared once, forks one confined process per action."""

    def __init__(self, cfg: dict, namespaces: dict[str, str], flags: int):
        self.cfg = cfg
        self.policy = ImportPolicy(tuple(cfg["allowed_imports"]))
        self.isolation = dict(namespaces)
        if flags & osi.CLONE_NEWNET and not osi.loopback_only():
            self.isolation["network"] += " (WARNING: interfaces other than lo are visible)"
        self._stdin = FrameBuffer()
        self._pending: collections.deque = collections.deque()
        self._counter = 0
        osi.load_libc()
        self._prepare_python()
        self._prepare_filesystem(flags)
        self.drop_uid = self._probe_confinement()
        self._describe_limits()

    def _prepare_python(self) -> None:
        missing = []
        for name in sorted(self.policy.allowed):
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - reported as "not installed", the worker still starts
                missing.append(name)
        for name in _PRELOAD:
            if name.startswith("_") or name.split(".")[0] in self.policy.allowed:
                importlib.import_module(name)
        denied = self.policy.deny_objects()
        patched = patch_libraries(self.policy)
        os.environ.clear()
        gc.freeze()  # keep the preloaded heap out of the collector: fewer copy-on-write pages per fork
        self.baseline_mb = osi.address_space_mb()
        if self.baseline_mb + 64 > self.cfg["memory_mb"]:
            raise RuntimeError(f"memory_mb={self.cfg['memory_mb']} leaves no room: the interpreter with the "
                               f"allowed modules preloaded already maps {self.baseline_mb:.0f} MB")
        allowed = ", ".join(sorted(self.policy.allowed))
        self.isolation["imports"] = (f"allowlist checked before running: {allowed}"
                                     + (f" (not installed: {', '.join(missing)})" if missing else ""))
        self.isolation["python_guard"] = (
            "AST check (imports, '_'-prefixed, frame and traceback attributes, eval/exec/compile/...), "
            f"restricted builtins, read-only module proxies, {len(denied)} library escape hatches denied, "
            f"string evaluators checked ({', '.join(patched) or 'none loaded'})")
        self.isolation["environment"] = "empty"

    def _prepare_filesystem(self, flags: int) -> None:
        jail_dir = self.cfg["jail_dir"]
        size_mb = max(64, 4 * self.cfg["file_size_mb"])
        reason = "no private mount namespace"
        if flags & osi.CLONE_NEWNS:
            try:
                sources = osi.build_jail(jail_dir, size_mb)
            except OSError as exc:
                reason = str(exc)
            else:
                self.work_root = "/work"
                self.isolation["filesystem"] = (
                    f"chroot jail on a private {size_mb} MB tmpfs; read-only: {', '.join(sources)}; "
                    "a fresh empty working directory per action; the rest of the host is invisible")
                return
        self.work_root = jail_dir
        self.isolation["filesystem"] = (f"not jailed ({reason}); the Python guard confines open() to a fresh "
                                        "working directory per action")

    def _new_work_dir(self, owner_nobody: bool) -> str:
        self._counter += 1
        path = os.path.join(self.work_root, f"action-{self._counter}")
        shutil.rmtree(path, ignore_errors=True)
        os.mkdir(path, 0o700)
        if owner_nobody:
            os.chown(path, osi.NOBODY, osi.NOBODY)
        return path

    def _probe_confinement(self) -> bool:
        """Try the action set-up in throw-away processes; return whether actions can drop to nobody."""
        for drop_uid in ((True, False) if os.geteuid() == 0 else (False,)):
            try:
                work_dir = self._new_work_dir(drop_uid)
            except PermissionError:  # root without CAP_CHOWN (a container): cannot hand over a directory
                continue
            code = self._probe_once(work_dir, drop_uid)
            shutil.rmtree(work_dir, ignore_errors=True)
            if code in (0, PROBE_FORK_ALLOWED):
                self.isolation["user"] = ("nobody (uid 65534): no capabilities, no_new_privs" if drop_uid
                                          else f"uid {os.geteuid()} (unchanged), no_new_privs")
                self.isolation["processes"] = ("fork blocked (RLIMIT_NPROC=0)" if code == 0 else
                                               "fork NOT blocked (RLIMIT_NPROC is not enforced for root)")
                return drop_uid
        raise RuntimeError("the per-action confinement (rlimits, prctl) fails in this environment")

    def _probe_once(self, work_dir: str, drop_uid: bool) -> int:
        """Exit code of a process put through ``confine_action_process``: 0 (fork blocked),
        PROBE_FORK_ALLOWED, anything else when the set-up failed."""
        pid = os.fork()
        if pid == 0:
            code = EXIT_FAILED
            try:
                osi.confine_action_process(work_dir, drop_uid, self.cfg, keep_fd=-1)
                try:
                    grandchild = os.fork()
                except OSError:
                    code = 0
                else:
                    if grandchild == 0:
                        os._exit(0)
                    os.waitpid(grandchild, 0)
                    code = PROBE_FORK_ALLOWED
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    def _describe_limits(self) -> None:
        cfg = self.cfg
        self.isolation["rlimits"] = (
            f"per action: CPU {cfg['cpu_time_s']} s (RLIMIT_CPU), address space {cfg['memory_mb']} MB "
            f"(RLIMIT_AS; the preloaded interpreter already maps {self.baseline_mb:.0f} MB), files up to "
            f"{cfg['file_size_mb']} MB (RLIMIT_FSIZE), 64 open files, no core dumps")
        self.isolation["wall_clock"] = (f"{cfg['wall_time_s']} s per action (time in web_search excluded), "
                                        "then killed")
        self.isolation["output"] = f"observation truncated beyond {cfg['max_output_chars']} characters"
        self.isolation["processes"] += "; one fresh forked process per action, discarded afterwards"

    # -- serving ---------------------------------------------------------------------------

    def _read_host(self) -> bool:
        """Read what the host sent into the pending queue; False when the host closed the pipe."""
        chunk = os.read(0, 1 << 20)
        if not chunk:
            return False
        self._pending.extend(self._stdin.feed(chunk))
        return True

    def serve(self) -> None:
        """Answer "run" frames until the host closes stdin."""
        write_all(1, encode_frame({"op": "ready", "isolation": self.isolation}))
        while True:
            while not self._pending:
                if not self._read_host():
                    return
            header, blob = self._pending.popleft()
            if header["op"] == "run":  # anything else is a late reply to a finished action
                result, new_blob = self._run(header["code"], blob)
                write_all(1, encode_frame(result, new_blob))

    def _run(self, code: str, blob: bytes) -> tuple[dict, bytes]:
        work_dir = self._new_work_dir(self.drop_uid)
        ours, theirs = socket.socketpair()
        try:
            pid = os.fork()
            if pid == 0:
                ours.close()
                _child_main(theirs, work_dir, code, blob, self)
            theirs.close()
            return self._supervise(pid, ours)
        finally:
            ours.close()
            shutil.rmtree(work_dir, ignore_errors=True)

    def _supervise(self, pid: int, sock: socket.socket) -> tuple[dict, bytes]:
        """Relay searches, enforce the wall clock, collect the result and the exit status."""
        buffer, result, failure = FrameBuffer(), None, None
        budget, started, waiting_for_host, timed_out = self.cfg["wall_time_s"], time.monotonic(), False, False
        while True:
            timeout = None if waiting_for_host else budget - (time.monotonic() - started)
            if timeout is not None and timeout <= 0:
                os.kill(pid, signal.SIGKILL)
                timed_out = True
                break
            ready, _, _ = select.select([sock, 0], [], [], timeout)
            if 0 in ready:
                if not self._read_host():  # the host is gone: nobody wants the answer
                    os.kill(pid, signal.SIGKILL)
                    os._exit(0)
                while self._pending and waiting_for_host:
                    header, _ = self._pending.popleft()
                    if header["op"] in ("search_result", "search_error"):
                        try:
                            sock.sendall(encode_frame(header))
                        except OSError:  # the action process is gone; its EOF comes next
                            pass
                        waiting_for_host, started = False, time.monotonic()
            if sock in ready:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                try:
                    frames = buffer.feed(chunk)
                except ProtocolError as exc:
                    failure = str(exc)
                    os.kill(pid, signal.SIGKILL)
                    break
                for header, data in frames:
                    is_query = isinstance(header.get("query"), str)
                    if header["op"] == "search" and not waiting_for_host and is_query:
                        budget -= time.monotonic() - started
                        waiting_for_host = True
                        write_all(1, encode_frame({"op": "search", "query": header["query"]}))
                    elif header["op"] == "result":
                        result = (header, data)
                    elif header["op"] == "failed":
                        failure = str(header.get("error"))
        status, rusage = self._reap(pid)
        return self._classify(result, failure, status, rusage.ru_utime + rusage.ru_stime, timed_out)

    @staticmethod
    def _reap(pid: int) -> tuple[int, object]:
        deadline = time.monotonic() + CHILD_EXIT_GRACE_S
        pause = 0.0005
        while True:
            done, status, rusage = os.wait4(pid, os.WNOHANG)
            if done:
                return status, rusage
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                _, status, rusage = os.wait4(pid, 0)
                return status, rusage
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _classify(self, result, failure, status: int, cpu_s: float, timed_out: bool) -> tuple[dict, bytes]:
        cfg = self.cfg
        if result is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            return result
        if timed_out:
            return _failure("timeout", f"TimeoutError: the action exceeded the wall-clock limit of "
                                       f"{cfg['wall_time_s']} s and was stopped"), b""
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= cfg["cpu_time_s"] - 0.1):
                return _failure("timeout", f"TimeoutError: the action exceeded the CPU time limit of "
                                           f"{cfg['cpu_time_s']} s and was stopped"), b""
            return _failure("crash", f"the process running the action was killed by "
                                     f"{signal.Signals(sig).name}; its effects were discarded"), b""
        code = os.WEXITSTATUS(status)
        if code == EXIT_MEMORY:
            message = f"MemoryError: the action exceeded the memory limit of {cfg['memory_mb']} MB"
            return _failure("memory", message), b""
        detail = f": {failure}" if failure else ""
        return _failure("crash", f"the process running the action exited with status {code} "
                                 f"without a result{detail}"), b""


def _become_pid_one() -> None:
    """After unshare(CLONE_NEWPID): fork; the child (pid 1 inside) goes on, this process waits and exits."""
    pid = os.fork()
    if pid == 0:
        return
    os.close(0)
    os.close(1)
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def main(config_json: str) -> None:
    """Entry point of the worker process (see the module docstring)."""
    cfg = json.loads(config_json)
    try:
        flags, namespaces = osi.enter_namespaces(cfg["network"])
        if flags & osi.CLONE_NEWPID:
            _become_pid_one()
        zygote = Zygote(cfg, namespaces, flags)
    except BaseException:  # noqa: BLE001 - any start-up failure goes to the host as "fatal"
        write_all(1, encode_frame({"op": "fatal", "error": traceback.format_exc()[-4000:]}))
        raise SystemExit(1) from None
    zygote.serve()
    os._exit(0)  # skip interpreter teardown: nothing to flush, and sympy's is slow
