"""The artifact store: versioned, content-addressed stage outputs on disk.

An artifact is the folder ``<root>/<stage>/<id>/``. Its ``manifest.json`` is written last: a folder
without it is incomplete and is never read (not by the catalog, not by a later stage). Ids are content
hashes of (stage, config, parent ids, code version), so the same inputs give the same id and a
finished stage is found instead of re-run. Every file is written atomically (temporary name in the
same folder, then ``os.replace``), and parts have deterministic names, so a retried writer replaces
its own file instead of adding a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import UserError
from common.files import atomic_file, atomic_write_json, clean_stale_temp
from storage.schemas import conform

MANIFEST = "manifest.json"
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
        pq.write_table(table, tmp)


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
            "row_counts": self.row_counts, "metrics": self.metrics,
        }
        atomic_write_json(self.path / MANIFEST, manifest)
        return self.ref


class ArtifactStore:
    """Artifacts under one root folder."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_root()

    def ref(self, stage: str, id_: str) -> ArtifactRef:
        return ArtifactRef(stage, id_, str(self.root.resolve()))


    def exists(self, ref: ArtifactRef) -> bool:
        return (ref.path / MANIFEST).is_file()

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
        plan.ref.path.mkdir(parents=True, exist_ok=True)
        clean_stale_temp(plan.ref.path)
        return Artifact(plan.ref, plan.config, list(plan.parents), plan.code or code_version())

    def manifest(self, id_or_ref: str | ArtifactRef) -> dict:
        """The manifest of a complete artifact, by id (any stage) or reference."""
        path = self.find(id_or_ref) if isinstance(id_or_ref, str) else id_or_ref.path
        manifest = path / MANIFEST
        if not manifest.is_file():
            raise ArtifactError(f"artifact {path.name} in {path.parent} is incomplete (no {MANIFEST})")
        try:
            return json.loads(manifest.read_text())
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{manifest}: not valid JSON ({exc})") from exc

    def find(self, id_: str) -> Path:
        """The folder of the complete artifact whose id is ``id_`` (a unique prefix is enough)."""
        matches = [p for p in self.root.glob(f"*/{id_}*") if (p / MANIFEST).is_file()]
        if not matches:
            raise ArtifactError(f"no complete artifact with id {id_!r} under {self.root}")
        if len(matches) > 1:
            raise ArtifactError(f"id prefix {id_!r} is ambiguous: {sorted(p.name for p in matches)}")
        return matches[0]

    def resolve(self, id_: str) -> ArtifactRef:
        path = self.find(id_)
        return self.ref(path.parent.name, path.name)

    def list(self, stage: str | None = None) -> list[dict]:
        """Manifests of all complete artifacts (of one stage), oldest first."""
        pattern = f"{stage}/*/{MANIFEST}" if stage else f"*/*/{MANIFEST}"
        manifests = []
        for path in self.root.glob(pattern):
            try:
                manifests.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue  # a manifest is written atomically; an unreadable one is not ours to guess
        return sorted(manifests, key=lambda m: (m.get("created", ""), m.get("id", "")))

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



