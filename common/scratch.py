"""The run's scratch folder: every temporary file or folder the project makes lives in it.

``scratch_dir()`` is ``$TMPDIR/distillery-<pid>-<start>-<random>``, made on first use by the process that
asks first (its owner; ``<start>`` is the owner's start time in 1/100 s since the machine booted) and removed when
the owner exits normally. Child processes inherit its path (``DISTILLERY_SCRATCH``) and use it instead of
making their own (unless given another $TMPDIR), so one folder holds a whole run: llama.cpp's slot files
and logs, sandbox folders.

A killed run cannot remove its folder. ``sweep()`` removes every scratch folder whose owner is gone: the
stage's reaper calls it once the stage has ended, however it ended (``flows.supervisor``), and each new
scratch folder is made after a sweep, so a killed run's folder goes at the latest when the next run
starts. The owner is known by its pid *and* start time, so a later process that got the same pid does
not keep a dead run's folder. (Owners are looked up in this machine's pid namespace: runs in other
containers must not share ``$TMPDIR``.)

Kept free of project imports, so every layer can use it.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import tempfile
import threading
from pathlib import Path

import psutil

SCRATCH_VARIABLE = "DISTILLERY_SCRATCH"
_NAME = re.compile(r"distillery-(\d+)-(\d+)-[0-9a-f]+")

_TICKS = os.sysconf("SC_CLK_TCK")
_lock = threading.Lock()
_owned: Path | None = None  # the folder this process made (and removes at exit)
_owner_pid: int | None = None  # a forked child inherits _owned, but the folder is not its to remove


def scratch_dir() -> Path:
    """This run's scratch folder: the inherited one if it still exists, else one made (and owned) now."""
    global _owned, _owner_pid
    with _lock:
        inherited = os.environ.get(SCRATCH_VARIABLE)
        # A child given another $TMPDIR (tests do that) makes its own folder there.
        if inherited and Path(inherited).is_dir() and Path(inherited).parent == Path(tempfile.gettempdir()):
            return Path(inherited)
        sweep()
        pid = os.getpid()
        folder = Path(tempfile.gettempdir()) / f"distillery-{pid}-{_start_time(pid)}-{secrets.token_hex(4)}"
        folder.mkdir(mode=0o700)
        # Traversable by others (not listable): the sandbox's actions run as nobody and must reach their
        # own folder inside.
        folder.chmod(0o711)
        _owned, _owner_pid = folder, pid
        os.environ[SCRATCH_VARIABLE] = str(folder)
        atexit.register(remove_scratch)
        return folder


def remove_scratch() -> None:
    """Remove the scratch folder this process made, if any (at exit; also callable before)."""
    global _owned
    with _lock:
        if _owned is not None and _owner_pid == os.getpid():
            shutil.rmtree(_owned, ignore_errors=True)
            if os.environ.get(SCRATCH_VARIABLE) == str(_owned):
                del os.environ[SCRATCH_VARIABLE]
            _owned = None


def sweep(tmp: Path | None = None) -> list[Path]:
    """Remove the scratch folders in ``tmp`` (default ``$TMPDIR``) whose owner process is gone; returns them."""
    removed = []
    for entry in Path(tmp or tempfile.gettempdir()).iterdir():
        match = _NAME.fullmatch(entry.name)
        if match and entry.is_dir() and not _owner_alive(int(match[1]), int(match[2])):
            shutil.rmtree(entry, ignore_errors=True)  # another user's folder stays (not ours to remove)
            if not entry.exists():
                removed.append(entry)
    return removed


def _start_time(pid: int) -> int:
    # The process's start in clock ticks since boot (1/100 s on Linux): fixed for the process's life. Not
    # create_time() since the epoch: psutil adds the boot time read from /proc/stat at each call, which
    # follows the wall clock (NTP, a VM's clock steps) and can move by a second, after which a live run's
    # folder would look orphaned and another run's sweep would remove it under it.
    # Field 22 of /proc/<pid>/stat (after the command name, which may hold spaces and parentheses).
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError) as gone:
        raise psutil.NoSuchProcess(pid) from gone
    return round(int(fields[19]) * 100 / _TICKS)


def _owner_alive(pid: int, start: int) -> bool:
    try:
        return abs(_start_time(pid) - start) <= 1  # the same process, not a later one with its pid
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # someone else's process: leave its folder alone
        return True
