"""Move artifacts between homes and machines: ``distillery artifacts export ID`` / ``import FILE``.

An export is a gzip-compressed tar holding ``export.json`` (what it carries, and the manifests of the
whole lineage) and the folders ``<stage>/<id>/`` of the artifact, plus those of its ancestors with
``with_parents``. Without them the file stays small (teacher trajectories: a few MB) and the lineage is
still known from ``export.json``; stages that start from an imported artifact name it by id
(``rollout.artifact``, ``prefixes.artifact``), so they do not need its parents.

Import checks every member before writing anything (only ``<stage>/<id>/…`` paths, regular files and
folders, a manifest whose id is its folder name), extracts each artifact into a temporary folder in
the target home, checks its files against the SHA-256 and sizes its manifest records (a manifest written
before checksums were recorded has none: imported unverified) and renames it into place, so an interrupted
or damaged import leaves no half artifact. A damaged archive (gzip's CRC) is refused before anything is
written. An artifact already in the home is kept (same manifest: skipped; different manifest: an error).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
import time
import zlib
from pathlib import Path, PurePosixPath

from common.files import TMP_MARK, atomic_write_json
from storage.integrity import check_files
from storage.store import MANIFEST, ArtifactError, ArtifactStore

EXPORT_INFO = "export.json"
FORMAT = "distillery-artifacts/1"
LEGACY_STAGES = {"trajectories": "rollout", "sft_data": "sft", "adapters": "train", "evals": "evaluate"}
"""Stage folders of exports made before the stages took one name each; imported under their new names."""


def export_artifact(store: ArtifactStore, id_: str, out: Path, with_parents: bool = False) -> dict:
    """Write ``out`` (.tar.gz) with artifact ``id_`` (and its ancestors' folders if ``with_parents``)."""
    lineage = store.lineage(id_)
    carried = lineage if with_parents else lineage[:1]
    for manifest in carried:  # a damaged artifact is not to travel (nor to be blessed by a new home)
        found = store.state(store.root / manifest["stage"] / manifest["id"], hashes=True)
        if found.state == "corrupt":
            raise ArtifactError(f"{found.stage}/{found.id} is corrupt ({'; '.join(found.problems)}); not exported")
    info = {"format": FORMAT, "artifact": lineage[0]["id"], "stage": lineage[0]["stage"],
            "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "artifacts": [f"{m['stage']}/{m['id']}" for m in carried], "lineage": lineage}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}{TMP_MARK}{os.getpid()}")
    try:
        with tarfile.open(partial, "w:gz", compresslevel=9) as tar:
            payload = json.dumps(info, indent=2).encode()
            member = tarfile.TarInfo(EXPORT_INFO)
            member.size, member.mtime = len(payload), int(time.time())
            tar.addfile(member, io.BytesIO(payload))
            for manifest in carried:
                folder = store.root / manifest["stage"] / manifest["id"]
                for path in sorted(folder.rglob("*")):
                    if TMP_MARK in path.name or path.name == MANIFEST:
                        continue  # temporaries never travel; the manifest goes last
                    tar.add(path, arcname=str(path.relative_to(store.root)), recursive=False)
                tar.add(folder / MANIFEST, arcname=f"{manifest['stage']}/{manifest['id']}/{MANIFEST}")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return info


def _checked_members(tar: tarfile.TarFile, source: Path) -> tuple[dict, dict[str, list[tarfile.TarInfo]]]:
    """The export info and the members of each ``stage/id`` folder, or an ArtifactError naming the problem."""
    try:
        info = json.load(tar.extractfile(EXPORT_INFO))
    except (KeyError, json.JSONDecodeError, AttributeError) as exc:
        raise ArtifactError(f"{source}: not a distillery export (no readable {EXPORT_INFO}: {exc})") from exc
    if info.get("format") != FORMAT:
        raise ArtifactError(f"{source}: export format {info.get('format')!r}, expected {FORMAT!r}")
    groups: dict[str, list[tarfile.TarInfo]] = {}
    for member in tar.getmembers():
        if member.name == EXPORT_INFO:
            continue
        parts = PurePosixPath(member.name).parts
        if len(parts) < 2 or member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
            raise ArtifactError(f"{source}: member {member.name!r} is not a file under <stage>/<id>/")
        groups.setdefault(f"{parts[0]}/{parts[1]}", []).append(member)
    if sorted(groups) != sorted(info["artifacts"]):
        raise ArtifactError(f"{source}: holds {sorted(groups)}, but its {EXPORT_INFO} lists {info['artifacts']}")
    for key, members in groups.items():
        if not any(m.name == f"{key}/{MANIFEST}" for m in members):
            raise ArtifactError(f"{source}: artifact {key} has no {MANIFEST}")
    return info, groups


def import_archive(store: ArtifactStore, source: Path) -> list[tuple[str, str]]:
    """Import every artifact of ``source`` into ``store``; ``[(stage/id, 'imported' | 'already present')]``."""
    try:  # read the whole gzip stream first: its CRC is checked only at its end, and tarfile may stop earlier
        with gzip.open(source) as stream:
            while stream.read(2**20):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise ArtifactError(f"{source}: not a readable .tar.gz export, or a damaged one ({exc}); nothing imported") from exc
    try:
        tar = tarfile.open(source, "r:gz")  # noqa: SIM115 -- closed by the `with` below, after the check
    except (OSError, tarfile.TarError) as exc:
        raise ArtifactError(f"{source}: not a readable .tar.gz export ({exc})") from exc
    results = []
    with tar:
        try:  # reads the archive to its end, so gzip checks its CRC before anything is written
            _, groups = _checked_members(tar, source)
        except (OSError, EOFError, zlib.error, tarfile.TarError) as exc:
            raise ArtifactError(f"{source}: damaged archive ({exc}); nothing imported") from exc
        for key, members in sorted(groups.items()):
            manifest = json.load(tar.extractfile(f"{key}/{MANIFEST}"))
            stage, id_ = key.split("/")
            if manifest.get("id") != id_ or manifest.get("stage") != stage:
                raise ArtifactError(f"{source}: {key}/{MANIFEST} names {manifest.get('stage')}/{manifest.get('id')}")
            stage = manifest["stage"] = LEGACY_STAGES.get(stage, stage)
            # One writer per artifact (storage.locks): a run building this artifact now finishes first.
            with store.lock(store.ref(stage, id_)):
                results.append((f"{stage}/{id_}", _import_artifact(store, tar, source, key, members, manifest)))
    return results


def _import_artifact(store: ArtifactStore, tar: tarfile.TarFile, source: Path, key: str, members: list,
                     manifest: dict) -> str:
    """Extract the artifact ``key`` (``<stage>/<id>`` in the archive) into place; 'imported' or 'already present'."""
    stage, id_ = manifest["stage"], manifest["id"]
    target = store.root / stage / id_
    if (target / MANIFEST).is_file():
        if json.loads((target / MANIFEST).read_text()) != manifest:
            raise ArtifactError(f"{target} already exists with a different manifest; not overwritten")
        return "already present"
    staging = store.root / stage / f"{id_}{TMP_MARK}{os.getpid()}-import"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for member in members:
            relative = PurePosixPath(member.name).relative_to(key)
            destination = staging / relative
            if member.isdir():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, destination.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        problems = check_files(staging, manifest.get("files", {}))
        if problems:  # damaged after its manifest was written, or in transit
            raise ArtifactError(f"{source}: {key} does not match its manifest ({'; '.join(problems)}); "
                                "not imported")
        if key.split("/")[0] != stage:  # an export of an older version: its stage renamed
            atomic_write_json(staging / MANIFEST, manifest)
        if target.exists():  # an incomplete folder (no manifest) of a writer that died: we hold its lock
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return "imported"
