"""What an artifact's files should hash to, and whether they still do.

``Artifact.finish`` records the SHA-256 and size of every file of the artifact in its manifest (``files``:
relative path → ``{"sha256", "bytes"}``), before the manifest is written. Left out: the manifest itself,
temporary files of writers, and ``checkpoints/`` (a training run's resumption state, rewritten by
``train --resume`` and pruned to ``keep_checkpoints``: not the artifact's content, and nothing downstream
reads it).

Hashing runs at ~1.6 GB/s on a CPU with SHA instructions (see README, "Artifacts"), so a file is hashed
at most once per process for a given (path, size, mtime): a stage that plans twice (the command, then
its flow) or a catalog opened twice does not pay twice.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from common.files import TMP_MARK

MANIFEST = "manifest.json"
SCRATCH = ("checkpoints",)
"""Top-level folders of an artifact that are resumption state, not content: never hashed or verified."""


def content_files(folder: Path) -> list[Path]:
    """The files an artifact holds (see the module docstring for what is left out), sorted."""
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if (not path.is_file() or relative.parts[0] in SCRATCH or str(relative) == MANIFEST
                or any(TMP_MARK in part for part in relative.parts)):
            continue
        files.append(path)
    return files


def file_checksums(folder: Path) -> dict[str, dict]:
    """``{relative path: {"sha256": hex, "bytes": size}}`` for every content file of ``folder``."""
    return {path.relative_to(folder).as_posix(): {"sha256": sha256(path), "bytes": path.stat().st_size}
            for path in content_files(folder)}


def sha256(path: Path) -> str:
    """The file's SHA-256, computed once per process for each (path, size, mtime)."""
    status = path.stat()
    return _sha256(str(path.resolve()), status.st_size, status.st_mtime_ns)


@lru_cache(maxsize=65536)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime_ns are part of the cache key only: a rewritten file is hashed again.
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def check_files(folder: Path, recorded: dict[str, dict], hashes: bool = True,
                only: list[str] | None = None) -> list[str]:
    """The problems of ``folder``'s files against the manifest's ``recorded`` checksums, one string each
    (``<file>: missing`` / ``<file>: size …`` / ``<file>: sha256 mismatch``); empty when all match.

    ``hashes=False`` checks presence and size only (a stat per file); ``only`` limits it to these files.
    """
    problems = []
    for name, expected in sorted(recorded.items()):
        if only is not None and name not in only:
            continue
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{name}: size {path.stat().st_size} bytes, the manifest says {expected['bytes']}")
        elif hashes and sha256(path) != expected["sha256"]:
            problems.append(f"{name}: sha256 mismatch")
    return problems

