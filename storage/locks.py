"""One writer per artifact: an exclusive file lock that a second writer waits for.

Two runs on one home (two ``distillery run``, a CLI run and a Prefect worker) may plan the same artifact at
once. Its builder holds the artifact's lock, ``<home>/.locks/<stage>/<id>.lock``, while it checks whether the
artifact exists and writes it; a second builder waits for the lock (one line names the artifact and the
holder: pid, host, since when), then finds the artifact complete and reuses it.

The lock is ``flock(2)`` on the lock file, held through an open descriptor: the kernel releases it when the
descriptor is closed, which includes the holder's death by any signal, SIGKILL too
(``tests/storage/test_locks.py`` kills a holder). So a lock is never stale; what a dead holder leaves is
only its last words in the file (its pid), which the next holder overwrites. The file itself is never
removed: unlinking a lock file while another process waits on it would give the next writer a new file,
and two writers. Descriptors are not inherited by programs a holder starts (Python opens them
close-on-exec); a child forked without exec shares the lock until it exits or the holder releases it.

A process holds one artifact lock at a time (the build loop builds one artifact after another), so two
runs cannot deadlock. Across machines this relies on the file system's flock: local disks, and NFS (v4, or
v3 with its lock manager), where Linux maps flock to byte-range locks.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from common.errors import UserError

POLL_S = 0.2
"""How often a waiting writer tries the lock again (it also notices a holder's death within this)."""


class LockTimeout(UserError):
    """A writer gave up waiting for another process's lock on an artifact (only with a ``timeout_s``)."""


@contextmanager
def exclusive(path: Path, what: str, timeout_s: float | None = None) -> Iterator[dict | None]:
    """Hold the lock ``path`` for the block; ``what`` names the locked thing in the waiting line.

    Waits while another process holds it, for as long as that process holds it (``timeout_s``: at most
    this long, then ``LockTimeout``). Yields the holder waited for (its ``pid``, ``host``, ``since``), or
    None when the lock was free.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        waited_for = wait_for_lock(fd, path, what, timeout_s)
        os.ftruncate(fd, 0)
        # The name is for waiters' messages only: a full disk must not stop a run that only reuses artifacts.
        with suppress(OSError):
            os.pwrite(fd, json.dumps(this_holder()).encode(), 0)
        try:
            yield waited_for
        finally:
            os.ftruncate(fd, 0)  # a waiter that reads the file next finds no stale holder in it
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def wait_for_lock(fd: int, path: Path, what: str, timeout_s: float | None) -> dict | None:
    """Take the lock on ``fd``, waiting while another process holds it; the holder waited for, or None."""
    started, holder, announced = time.monotonic(), None, False
    while not try_lock(fd):
        holder = read_holder(path) or holder
        if holder and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname():
            raise RuntimeError(f"{what}: this process (pid {os.getpid()}) already holds its lock {path}")
        # The holder writes its name just after taking the lock: wait a moment for it before saying "unknown".
        if not announced and (holder or time.monotonic() - started > 1):
            print(f"waiting for {what} built by {describe(holder)} (lock {path})", file=sys.stderr, flush=True)
            announced = True
        if timeout_s is not None and time.monotonic() - started >= timeout_s:
            raise LockTimeout(f"{what} is being built by {describe(holder)}; gave up waiting after "
                              f"{timeout_s:g} s (lock {path})")
        time.sleep(POLL_S)
    return holder


def try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def this_holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def read_holder(path: Path) -> dict | None:
    """Who holds the lock, as its holder wrote it; None while the file is empty (or not JSON: mid-write)."""
    try:
        holder = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    if isinstance(holder, dict) and isinstance(holder.get("pid"), int) and {"host", "since"} <= holder.keys():
        return holder
    return None


def describe(holder: dict | None) -> str:
    if holder is None:
        return "another process (not named in its lock file yet)"
    return f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
