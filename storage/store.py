"""The artifact store: versioned, content-addressed stage outputs on disk.

An artifact is the folder ``<root>/<stage>/<id>/``. Its ``manifest.json`` is written last: a folder
without it is incomplete and is never read (not by the catalog, not by a later stage). Ids are content
hashes of (stage, config, parent ids, code version), so the same inputs give the same id and a
finished stage is found instead of re-run. Every file is written atomically (temporary name in the
same folder, then ``os.replace``), and parts have deterministic names, so a retried writer replaces
its own file instead of adding a duplicate.

The manifest records the SHA-256 and size of every file (``storage.integrity``). A folder is in one of
three states: ``complete`` (a readable manifest), ``incomplete`` (no manifest yet: being written, or its
writer died) or ``corrupt`` (an unreadable manifest, or files that no longer match it). A corrupt artifact
does not exist for ``exists``, is named by ``scan``, and is moved aside (``set_aside``) before its stage
rebuilds it.

One process at a time writes an artifact: its writer holds the artifact's lock (``lock``, see
``storage.locks``) while it checks whether the artifact exists and writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import UserError
from common.files import atomic_file, atomic_write_json, clean_stale_temp
from storage.integrity import MANIFEST, check_files, file_checksums
from storage.locks import exclusive
from storage.schemas import conform

PACKAGES = ("agent_runtime", "devices", "models", "questions", "retrieval", "storage", "training", "evaluation",
            "tasks", "flows", "services", "common")
"""The project's packages: the code version of an artifact whose stage names no narrower set (a re-grade)."""


class ArtifactError(UserError, ValueError):
    """An artifact is missing, incomplete or unreadable."""


def default_root() -> Path:
    """The store root: ``$DISTILLERY_HOME`` or ``./.distillery``."""
    return Path(os.environ.get("DISTILLERY_HOME") or ".distillery")


@lru_cache(maxsize=16)
def code_version(packages: tuple[str, ...] = PACKAGES) -> str:
    """``<package version>+<hash of the source of packages>``: code changes give new artifact ids."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        base = version("distillery")
    except PackageNotFoundError:
        base = "0.0.0"
    digest = hashlib.sha256()
    top = Path(__file__).resolve().parent.parent
    for package in packages:
        for path in sorted((top / package).rglob("*.py")):
            digest.update(str(path.relative_to(top)).encode())
            digest.update(path.read_bytes())
    return f"{base}+{digest.hexdigest()[:12]}"


def canonical_json(value) -> str:
    """Stable JSON for hashing: sorted keys, no whitespace."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def artifact_id(stage: str, config: dict, parents: list[str], code: str) -> str:
    """The content hash that names an artifact: its stage, config, parents and code version."""
    payload = canonical_json({"stage": stage, "config": config, "parents": sorted(parents), "code": code})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def atomic_write_table(path: Path, table: pa.Table, schema: pa.Schema | None = None) -> None:
    """Write a Parquet file atomically, cast to ``schema`` when given."""
    if schema is not None:
        table = conform(table, schema)
    with atomic_file(path) as tmp:
        # Page checksums let pyarrow readers (page_checksum_verification=True) catch a damaged page.
        pq.write_table(table, tmp, write_page_checksum=True)


def student_adapters(inputs: dict[str, ArtifactRef]) -> dict[str, ArtifactRef]:
    """The trained students among a stage's inputs by kind: ``train/agent`` → ``agent``, ``opd/K`` → ``opd``."""
    return {("opd" if name.startswith("opd/") else name.partition("/")[2]): ref
            for name, ref in inputs.items() if name.startswith(("train/", "opd/"))}


def part_name(index: int) -> str:
    """Deterministic part file name, so a retried part replaces itself."""
    return f"part-{index:05d}.parquet"


@dataclass(frozen=True)
class ArtifactRef:
    """A small, picklable reference that tasks pass around instead of data."""

    stage: str
    id: str
    root: str

    @property
    def path(self) -> Path:
        return Path(self.root) / self.stage / self.id


@dataclass(frozen=True)
class StagePlan:
    """What a stage will produce: its reference plus the identity (config, parents) that names it."""

    ref: ArtifactRef
    config: dict
    parents: tuple[str, ...] = ()
    code: str = ""  # the code version in the id (``code_version`` of the stage's packages)


LOCKS = ".locks"
"""The folder under the root holding one lock file per artifact ever written (``<stage>/<id>.lock``)."""

ARTIFACT_ID = re.compile(r"[0-9a-f]{16}")
"""An artifact folder's name (``artifact_id``); other folders under a stage (set aside, temporary) are not."""


@dataclass(frozen=True)
class ArtifactState:
    """An artifact folder as found on disk: ``complete``, ``incomplete`` or ``corrupt`` (and why).

    ``manifest`` is None unless it could be read; ``problems`` are ``<file>: <what>`` lines.
    """

    stage: str
    id: str
    path: Path
    state: str
    manifest: dict | None = None
    problems: tuple[str, ...] = ()

    @property
    def checksummed(self) -> bool:
        """False for an artifact written before manifests recorded checksums: readable, but unverified."""
        return self.manifest is not None and "files" in self.manifest


def read_manifest(folder: Path) -> tuple[dict | None, str | None]:
    """``(manifest, None)``, or ``(None, why not)``: no manifest, unreadable, or naming another artifact."""
    path = folder / MANIFEST
    if not path.is_file():
        return None, "no manifest"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{MANIFEST}: unreadable ({exc})"
    if not isinstance(manifest, dict) or manifest.get("id") != folder.name:
        return None, f"{MANIFEST}: does not name this artifact ({folder.name})"
    return manifest, None


@dataclass
class Artifact:
    """An artifact being written. ``finish`` writes the manifest, which makes it visible."""

    ref: ArtifactRef
    config: dict
    parents: list[str]
    code: str
    row_counts: dict[str, int] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.ref.path

    def write_table(self, name: str, table: pa.Table, schema: pa.Schema, part: int | None = None) -> Path:
        """Write ``<name>.parquet`` (or part ``part`` of ``<name>/``) atomically, cast to ``schema``."""
        target = self.path / f"{name}.parquet" if part is None else self.path / name / part_name(part)
        atomic_write_table(target, table, schema)
        return target

    def finish(self, row_counts: dict[str, int] | None = None, metrics: dict | None = None) -> ArtifactRef:
        self.row_counts.update(row_counts or {})
        self.metrics.update(metrics or {})
        manifest = {
            "stage": self.ref.stage, "id": self.ref.id, "config": self.config, "parents": self.parents,
            "code_version": self.code, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "row_counts": self.row_counts, "metrics": self.metrics, "files": file_checksums(self.path),
        }
        atomic_write_json(self.path / MANIFEST, manifest)
        return self.ref


class ArtifactStore:
    """Artifacts under one root folder."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_root()

    def ref(self, stage: str, id_: str) -> ArtifactRef:
        return ArtifactRef(stage, id_, str(self.root.resolve()))

    def lock(self, ref: ArtifactRef, timeout_s: float | None = None):
        """A context manager holding ``ref``'s lock, which makes its holder the one writer of the artifact.

        Waits while another process holds it; yields the holder waited for, or None (``storage.locks``).
        """
        path = Path(ref.root) / LOCKS / ref.stage / f"{ref.id}.lock"
        return exclusive(path, f"{ref.stage}/{ref.id}", timeout_s)

    def exists(self, ref: ArtifactRef) -> bool:
        """Whether ``ref`` is built: its manifest is there and readable (a corrupt one is not built)."""
        return read_manifest(ref.path)[0] is not None

    def plan_stage(self, stage: str, config: dict, parents: list[str] = (), code: str | None = None) -> StagePlan:
        """The artifact these inputs name (whether or not it exists yet); ``code`` defaults to every package's."""
        code = code or code_version()
        return StagePlan(self.ref(stage, artifact_id(stage, config, list(parents), code)), config, tuple(parents),
                         code)

    def begin(self, stage: str, config: dict, parents: list[str] = ()) -> Artifact:
        """Start (or resume) writing the artifact for these inputs; its folder keeps finished parts."""
        return self.open(self.plan_stage(stage, config, parents))

    def open(self, plan: StagePlan) -> Artifact:
        """Start (or resume) writing a planned artifact; finished parts in its folder are kept."""
        found = self.state(plan.ref.path)
        if found.state == "corrupt":  # its files are not to be kept as finished parts
            self.set_aside(plan.ref, "; ".join(found.problems))
        plan.ref.path.mkdir(parents=True, exist_ok=True)
        clean_stale_temp(plan.ref.path)
        return Artifact(plan.ref, plan.config, list(plan.parents), plan.code or code_version())

    def manifest(self, id_or_ref: str | ArtifactRef) -> dict:
        """The manifest of a complete artifact, by id (any stage) or reference."""
        path = self.find(id_or_ref) if isinstance(id_or_ref, str) else id_or_ref.path
        manifest, problem = read_manifest(path)
        if manifest is None and problem == "no manifest":
            raise ArtifactError(f"artifact {path.name} in {path.parent} is incomplete (no {MANIFEST})")
        if manifest is None:
            raise ArtifactError(f"artifact {path.parent.name}/{path.name} is corrupt: {problem}")
        return manifest

    def find(self, id_: str) -> Path:
        """The folder of the complete artifact whose id is ``id_`` (a unique prefix is enough)."""
        matches = [p for p in self.root.glob(f"*/{id_}*") if ARTIFACT_ID.fullmatch(p.name) and (p / MANIFEST).is_file()]
        if not matches:
            raise ArtifactError(f"no complete artifact with id {id_!r} under {self.root}")
        if len(matches) > 1:
            raise ArtifactError(f"id prefix {id_!r} is ambiguous: {sorted(p.name for p in matches)}")
        return matches[0]

    def resolve(self, id_: str) -> ArtifactRef:
        path = self.find(id_)
        return self.ref(path.parent.name, path.name)

    def list(self, stage: str | None = None) -> list[dict]:
        """Manifests of all complete artifacts (of one stage), oldest first; ``scan`` names the others."""
        manifests = [s.manifest for s in self.scan(stage) if s.state == "complete"]
        return sorted(manifests, key=lambda m: (m.get("created", ""), m.get("id", "")))

    def scan(self, stage: str | None = None, hashes: bool = False) -> list[ArtifactState]:
        """Every artifact folder (of one stage) and its state, by stage and id.

        Files are checked for presence and size; ``hashes=True`` also re-hashes them (``verify``).
        """
        folders = self.root.glob(f"{stage}/*" if stage else "*/*")
        return [self.state(p, hashes) for p in sorted(folders) if p.is_dir() and ARTIFACT_ID.fullmatch(p.name)]

    def state(self, folder: Path, hashes: bool = False, only: list[str] | None = None) -> ArtifactState:
        """The state of the artifact folder ``folder`` (see ``scan``; ``only``: check just these files)."""
        manifest, problem = read_manifest(folder)
        if manifest is None:
            state = "incomplete" if problem == "no manifest" else "corrupt"
            return ArtifactState(folder.parent.name, folder.name, folder, state, None, (problem,))
        problems = tuple(check_files(folder, manifest.get("files", {}), hashes, only))
        return ArtifactState(folder.parent.name, folder.name, folder, "corrupt" if problems else "complete",
                             manifest, problems)

    def set_aside(self, ref: ArtifactRef, why: str) -> Path:
        """Move a corrupt artifact's folder to ``<stage>/<id>.corrupt-<time>/`` (kept for inspection, never
        read), so its stage can rebuild it in a fresh folder; prints one warning line naming it."""
        aside = ref.path.with_name(f"{ref.id}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        os.replace(ref.path, aside)
        print(f"warning: {ref.stage}/{ref.id} is corrupt ({why}); moved to {aside}; rebuilding it", file=sys.stderr)
        return aside

    def lineage(self, id_: str) -> list[dict]:
        """The artifact and all its ancestors, nearest first."""
        seen: dict[str, dict] = {}
        queue = [self.resolve(id_).id]
        while queue:
            current = queue.pop(0)
            if current in seen:
                continue
            try:
                seen[current] = self.manifest(current)
            except ArtifactError:  # an ancestor not in this home (an artifact imported without parents)
                seen[current] = {"stage": None, "id": current, "parents": [], "missing": True}
            queue.extend(seen[current].get("parents", []))
        return list(seen.values())

    def clean_stale(self) -> int:
        """Remove temporary files left by writers that died; returns how many were removed."""
        if not self.root.is_dir():
            return 0
        return sum(clean_stale_temp(p) for p in self.root.glob("*/*") if p.is_dir())



