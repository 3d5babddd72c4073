"""Export and import of artifacts between homes: files, manifests, lineage, refusals, and the pins that use them."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import pyarrow as pa
import pytest

from storage.store import ArtifactError, ArtifactStore
from storage.transfer import export_artifact, import_archive

SCHEMA = pa.schema([("question_id", pa.string()), ("correct", pa.bool_())])


def make_lineage(root) -> tuple[ArtifactStore, str, str]:
    store = ArtifactStore(root)
    parent = store.begin("index", {"k": 1})
    parent.write_table("passages", pa.table({"question_id": ["p"], "correct": [True]}), SCHEMA)
    parent_ref = parent.finish({"passages": 1})
    child = store.begin("rollout", {"k": 2}, [parent_ref.id])
    child.write_table("episodes", pa.table({"question_id": ["q1", "q2"], "correct": [True, False]}), SCHEMA, part=0)
    child_ref = child.finish({"episodes": 2})
    return store, parent_ref.id, child_ref.id


def test_export_then_import_moves_the_artifact_and_keeps_its_lineage(tmp_path):
    source, parent, child = make_lineage(tmp_path / "a")
    info = export_artifact(source, child, tmp_path / "t.tar.gz")
    assert info["artifacts"] == [f"rollout/{child}"] and [m["id"] for m in info["lineage"]] == [child, parent]

    target = ArtifactStore(tmp_path / "b")
    assert import_archive(target, tmp_path / "t.tar.gz") == [(f"rollout/{child}", "imported")]
    assert target.manifest(child) == source.manifest(child)
    episodes = tmp_path / "b" / "rollout" / child / "episodes" / "part-00000.parquet"
    assert pa.parquet.read_table(episodes).column("question_id").to_pylist() == ["q1", "q2"]
    assert [(m["id"], m.get("missing", False)) for m in target.lineage(child)] == [(child, False), (parent, True)]
    assert import_archive(target, tmp_path / "t.tar.gz") == [(f"rollout/{child}", "already present")]


def test_an_export_of_the_old_stage_names_is_imported_under_the_new_ones(tmp_path):
    """Exports made before the stages took one name each (the study's committed ones) still import."""
    old = ArtifactStore(tmp_path / "old")
    legacy = old.begin("evals", {"k": 3})
    legacy.write_table("episodes", pa.table({"question_id": ["q1"], "correct": [True]}), SCHEMA)
    legacy_id = legacy.finish({"episodes": 1}).id
    export_artifact(old, legacy_id, tmp_path / "old.tar.gz")

    target = ArtifactStore(tmp_path / "new")
    assert import_archive(target, tmp_path / "old.tar.gz") == [(f"evaluate/{legacy_id}", "imported")]
    manifest = target.manifest(legacy_id)
    assert manifest["stage"] == "evaluate" and manifest["id"] == legacy_id
    assert {k: v for k, v in manifest.items() if k != "stage"} == {
        k: v for k, v in old.manifest(legacy_id).items() if k != "stage"}
    assert (tmp_path / "new" / "evaluate" / legacy_id / "episodes.parquet").is_file()
    assert not (tmp_path / "new" / "evals").exists()
    assert import_archive(target, tmp_path / "old.tar.gz") == [(f"evaluate/{legacy_id}", "already present")]


def test_with_parents_carries_every_ancestor(tmp_path):
    source, parent, child = make_lineage(tmp_path / "a")
    export_artifact(source, child, tmp_path / "t.tar.gz", with_parents=True)
    target = ArtifactStore(tmp_path / "b")
    assert sorted(import_archive(target, tmp_path / "t.tar.gz")) == [
        (f"index/{parent}", "imported"), (f"rollout/{child}", "imported")]
    assert [m["id"] for m in target.lineage(child)] == [child, parent]


def test_an_existing_artifact_with_another_manifest_is_not_overwritten(tmp_path):
    source, _, child = make_lineage(tmp_path / "a")
    export_artifact(source, child, tmp_path / "t.tar.gz")
    target = ArtifactStore(tmp_path / "b")
    import_archive(target, tmp_path / "t.tar.gz")
    manifest = tmp_path / "b" / "rollout" / child / "manifest.json"
    changed = {**json.loads(manifest.read_text()), "created": "another day"}
    manifest.write_text(json.dumps(changed))
    with pytest.raises(ArtifactError, match="already exists with a different manifest"):
        import_archive(target, tmp_path / "t.tar.gz")
    assert json.loads(manifest.read_text()) == changed


def hostile_archive(path, member_name: str) -> None:
    info = {"format": "distillery-artifacts/1", "artifacts": ["rollout/x"], "lineage": []}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("export.json", json.dumps(info).encode()), (member_name, b"boom")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"not a tar"), "not a readable .tar.gz export"),
    (lambda p: hostile_archive(p, "../../evil.txt"), "is not a file under <stage>/<id>/"),
    (lambda p: hostile_archive(p, "rollout/x/episodes.parquet"), "has no manifest.json"),
    (lambda p: hostile_archive(p, "evaluate/y/manifest.json"), "but its export.json lists"),
])
def test_a_bad_archive_is_one_error_and_writes_nothing(tmp_path, make, message):
    archive = tmp_path / "bad.tar.gz"
    make(archive)
    with pytest.raises(ArtifactError, match=message):
        import_archive(ArtifactStore(tmp_path / "home"), archive)
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*"))
    assert not (tmp_path / "evil.txt").exists()


def test_the_cli_exports_and_imports_and_a_pin_names_the_stage(tmp_path):
    from flows.config import PipelineConfig
    from flows.plans import pinned

    _, _, child = make_lineage(tmp_path / "a")
    run = [sys.executable, "-m", "flows.cli"]
    out = subprocess.run([*run, "--home", str(tmp_path / "a"), "artifacts", "export", child[:8],
                          "--out", str(tmp_path / "t.tar.gz")], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and f"exported rollout/{child}" in out.stdout, out.stderr
    out = subprocess.run([*run, "--home", str(tmp_path / "b"), "artifacts", "import", str(tmp_path / "t.tar.gz")],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0 and f"rollout/{child}: imported" in out.stdout, out.stderr

    target = ArtifactStore(tmp_path / "b")
    cfg = PipelineConfig.model_validate({"rollout": {"artifact": child}})
    assert pinned(target, cfg.rollout.artifact, "rollout").id == child
    with pytest.raises(ArtifactError, match="is a rollout artifact, not prefixes"):
        pinned(target, child, "prefixes")
