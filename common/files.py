"""Writing files so that a reader sees the old file or the whole new one, never a part, in every layer.

A writer writes under a temporary name beside the target (``<name>.tmp-<pid>-…``, so cleaning never removes
a live writer's file), syncs it and renames it into place; a writer that died leaves only temporary names,
which ``clean_stale_temp`` removes.

A write that runs out of space (``ENOSPC``/``EDQUOT``, however the writing library words it) raises
``DiskFull`` naming the file; its temporary file is removed, so the target keeps its old content or stays
absent, and nothing half-written is ever renamed into place.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.errors import DiskFull

TMP_MARK = ".tmp-"


def cache_dir() -> Path:
    """The project's cache on this machine: ``$XDG_CACHE_HOME/distillery`` (``~/.cache/distillery`` when unset
    or empty), read at each call so that a changed environment is followed."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "distillery"


def temp_prefix(name: str) -> str:
    """Temporary names carry the writer's pid, so cleaning never removes a live writer's file."""
    return f"{name}{TMP_MARK}{os.getpid()}-"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, value) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode())


@contextmanager
def atomic_file(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary name beside ``path`` for a writer that wants a file name (Parquet, GGUF, a plot);
    the file is synced and renamed into place when the block succeeds, and removed when it fails.

    ``suffix`` ends the temporary name, for writers that choose a format by it (``.png``).
    """
    with named_if_disk_full(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        with named_if_disk_full(path):  # inside: the disk is still full while the partial file is there
            yield Path(tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path, replace: bool = True) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it into place when the block succeeds.

    ``replace=False``: a folder that another writer put at ``path`` first is kept, and this one dropped.
    """
    with named_if_disk_full(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), dir=path.parent))
    try:
        with named_if_disk_full(path):
            yield tmp
            if replace:
                move_dir_into_place(tmp, path)
            else:
                try:
                    os.replace(tmp, path)
                except OSError:  # another writer's folder is there: keep it
                    pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def named_if_disk_full(path: Path) -> Iterator[None]:
    """Turn a write error that ran out of space into ``DiskFull`` naming ``path`` (see the module docstring)."""
    try:
        yield
    except DiskFull:  # an inner write (a file inside an atomic folder) named it already
        raise
    except Exception as exc:
        if out_of_space(exc, path.parent):
            raise DiskFull(f"no space left on device writing {path}; free space there and run again "
                           "(the files finished before are kept)") from exc
        raise


def out_of_space(exc: Exception, folder: Path) -> bool:
    """Whether ``exc`` is a write that ran out of space. pyarrow and plain writes raise OSError with the errno;
    faiss and safetensors put the C library's words in a RuntimeError; torch.save says neither ("unexpected
    pos"), so a file system left without one free block counts too."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if os.strerror(errno.ENOSPC) in str(exc) or os.strerror(errno.EDQUOT) in str(exc):
        return True
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


def move_dir_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished folder ``tmp`` to ``path``, replacing a folder there (e.g. an older copy)."""
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def clean_stale_temp(folder: Path) -> int:
    """Delete temporary files and folders under ``folder`` whose writer process is gone."""
    removed = 0
    for path in folder.rglob(f"*{TMP_MARK}*"):
        if _writer_alive(path.name):
            continue
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed += 1
        except FileNotFoundError:
            continue
    return removed


def _writer_alive(name: str) -> bool:
    pid_text = name.split(TMP_MARK, 1)[1].split("-", 1)[0]
    if not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
