"""Faults on disk: flipped bytes, truncated manifests and damaged archives are named, never used silently.

Each test damages a real artifact the way a disk, a copy or an editor would, then checks who notices:
``distillery artifacts verify``, the catalog (``distillery query``), the plan of a re-run, and import.
"""

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from flows.config import PipelineConfig
from flows.plans import plan_pipeline
from storage.catalog import open_catalog, read_table
from storage.schemas import EPISODES, PASSAGES
from storage.store import MANIFEST, ArtifactError, ArtifactStore
from storage.transfer import export_artifact, import_archive


def flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def last_data_byte(path) -> int:
    """An offset inside the last data page of the first column (not in a header or the footer)."""
    column = pq.ParquetFile(path).metadata.row_group(0).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    return start + column.total_compressed_size - 1


def adapter_like(store: ArtifactStore, config: dict | None = None):
    """A train-like artifact: a binary weights file, a JSON config, a Parquet table and scratch checkpoints."""
    art = store.begin("train", config or {"lr": 1e-4})
    (art.path / "adapter").mkdir(parents=True)
    (art.path / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    (art.path / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8, "alpha": 16}))
    (art.path / "checkpoints" / "step-1").mkdir(parents=True)
    (art.path / "checkpoints" / "step-1" / "state.bin").write_bytes(b"resume state")
    art.write_table("episodes", pa.table({"question_id": [f"q{i}" for i in range(500)]}), EPISODES, part=0)
    return art.finish({"episodes": 500})


def verify(home, *ids, capsys):
    code = main(["--home", str(home), "artifacts", "verify", *ids])
    return code, capsys.readouterr().out.splitlines()


def test_the_manifest_records_every_content_file_but_not_checkpoints(home):
    ref = adapter_like(ArtifactStore(home))
    files = ArtifactStore(home).manifest(ref)["files"]
    assert sorted(files) == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                             "episodes/part-00000.parquet"]
    assert files["adapter/adapter_model.safetensors"]["bytes"] == 2**20
    assert len(files["adapter/adapter_config.json"]["sha256"]) == 64


@pytest.mark.parametrize("name", ["episodes/part-00000.parquet", "adapter/adapter_model.safetensors",
                                  "adapter/adapter_config.json"])
def test_verify_names_a_flipped_byte_in_any_file_and_exits_2(home, capsys, name):
    store = ArtifactStore(home)
    ref = adapter_like(store)
    good = adapter_like(store, {"lr": 2e-4})
    code, lines = verify(home, capsys=capsys)
    assert code == 0 and lines[-1].startswith("checked 2 artifacts (6 files,")
    path = ref.path / name
    flip_byte(path, last_data_byte(path) if name.endswith(".parquet") else path.stat().st_size // 2)
    code, lines = verify(home, capsys=capsys)
    assert code == 2
    assert lines[:-1] == [f"corrupt: train/{ref.id}/{name}: sha256 mismatch"]
    assert lines[-1].endswith(": 1 corrupt, 0 unverified, 0 incomplete")
    assert verify(home, good.id, capsys=capsys)[0] == 0  # by id: only that one is checked


def test_verify_names_a_missing_or_resized_file_and_a_checkpoint_does_not_count(home, capsys):
    ref = adapter_like(ArtifactStore(home))
    (ref.path / "checkpoints" / "step-1" / "state.bin").write_bytes(b"a later checkpoint")  # scratch
    assert verify(home, capsys=capsys)[0] == 0
    (ref.path / "adapter" / "adapter_config.json").unlink()
    with (ref.path / "adapter" / "adapter_model.safetensors").open("ab") as handle:
        handle.write(b"x")
    code, lines = verify(home, ref.id[:6], capsys=capsys)
    assert code == 2 and lines[:-1] == [
        f"corrupt: train/{ref.id}/adapter/adapter_config.json: missing",
        f"corrupt: train/{ref.id}/adapter/adapter_model.safetensors: size 1048577 bytes, the manifest says 1048576"]


def test_an_artifact_from_before_checksums_is_unverified_never_corrupt(home, capsys):
    store = ArtifactStore(home)
    ref = adapter_like(store)
    manifest = json.loads((ref.path / MANIFEST).read_text())
    del manifest["files"]
    (ref.path / MANIFEST).write_text(json.dumps(manifest))
    flip_byte(ref.path / "adapter" / "adapter_model.safetensors", 10)  # nothing records what it was
    code, lines = verify(home, capsys=capsys)
    assert code == 0
    assert lines[0] == (f"unverified: train/{ref.id}: its manifest records no checksums "
                        "(written before they were recorded)")
    assert store.exists(ref) and store.state(ref.path, hashes=True).state == "complete"


def test_a_flipped_parquet_page_fails_its_page_checksum_and_the_catalog_skips_the_file(home):
    store = ArtifactStore(home)
    art = store.begin("rollout", {"n": 1})
    good = art.write_table("episodes", pa.table({"question_id": ["a", "b"]}), EPISODES, part=0)
    bad = art.write_table("episodes", pa.table({"question_id": [f"q{i}" for i in range(500)]}), EPISODES, part=1)
    art.finish()
    flip_byte(bad, last_data_byte(bad))
    with pytest.raises(ArtifactError, match=f"corrupt Parquet file {bad}: .*CRC checksum verification failed"):
        read_table(art.path, "episodes")
    warnings = []
    con = open_catalog(home, warn=warnings.append)
    assert con.execute("select question_id from episodes order by 1").fetchall() == [("a",), ("b",)]
    assert warnings == [(f"corrupt artifact rollout/{art.ref.id} ({art.path}): episodes/part-00001.parquet: sha256 "
                        "mismatch; its damaged Parquet files are skipped")]
    assert con.execute("select state, problem from artifacts").fetchall() == [
        ("corrupt", "episodes/part-00001.parquet: sha256 mismatch")]
    assert good.exists()


def test_a_truncated_manifest_is_listed_as_corrupt_with_one_warning_and_is_not_built(home, capsys):
    store = ArtifactStore(home)
    ref = adapter_like(store)
    writing = store.begin("rollout", {"live": True})  # a live writer's folder: incomplete, no warning
    manifest = ref.path / MANIFEST
    manifest.write_bytes(manifest.read_bytes()[:40])
    assert not store.exists(ref) and store.list() == []
    assert [(s.stage, s.state) for s in store.scan()] == [("rollout", "incomplete"), ("train", "corrupt")]
    assert main(["--home", str(home), "query", "select stage, id, state from artifacts order by state",
                 "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["stage,id,state", f"train,{ref.id},corrupt", f"rollout,{writing.ref.id},incomplete"]
    [warning] = err.splitlines()
    assert warning.startswith(f"warning: corrupt artifact train/{ref.id} ({ref.path}): manifest.json: unreadable (")
    assert warning.endswith("; it is skipped")
    code, lines = verify(home, capsys=capsys)
    assert code == 2 and lines[0] == (f"incomplete: rollout/{writing.ref.id}: no manifest yet (being written, "
                                      "or its writer died)")  # listed by stage, then id; not an error
    assert lines[1].startswith(f"corrupt: train/{ref.id}/manifest.json: unreadable (")
    assert lines[2].endswith(": 1 corrupt, 0 unverified, 1 incomplete")


@pytest.fixture
def config(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "1", "title": "Mars", "text": "Mars is red."}) + "\n")
    questions = tmp_path / "math.jsonl"
    questions.write_text(json.dumps({"id": "q1", "question": "What is 2 + 3?", "answer": "5"}) + "\n")
    dataset = {"name": "math", "source": str(questions), "kind": "math"}
    return PipelineConfig.model_validate({
        "index": {"corpus": {"source": str(corpus)}}, "teacher": {"kind": "scripted", "model": "teacher"},
        "rollout": {"datasets": [dataset], "use_prefixes": False}, "evaluate": {"datasets": [dataset]},
    })


def build_index(store: ArtifactStore, cfg) -> None:
    """Stand in for the index stage: the planned index artifact with one Parquet file."""
    art = store.open(plan_pipeline(store, cfg, ("index",))["index"].plan)
    art.write_table("passages", pa.table({"id": [f"p{i}" for i in range(500)]}), PASSAGES)
    art.finish()


def test_a_rerun_that_reads_a_corrupt_artifact_moves_it_aside_and_rebuilds_it(home, config, capsys):
    store = ArtifactStore(home)
    build_index(store, config)
    index = plan_pipeline(store, config, ("rollout",)).ref("index")
    assert not plan_pipeline(store, config, ("rollout",)).missing("index")
    passages = index.path / "passages.parquet"
    flip_byte(passages, last_data_byte(passages))
    damaged = passages.read_bytes()
    plan = plan_pipeline(store, config, ("rollout",))  # rollout is missing, so it reads the index: re-hashed
    assert plan.missing("index") and plan.missing("rollout") and not index.path.exists()
    [aside] = (home / "index").glob(f"{index.id}.corrupt-*")
    assert (aside / "passages.parquet").read_bytes() == damaged  # kept for inspection
    assert capsys.readouterr().err == (f"warning: index/{index.id} is corrupt (passages.parquet: sha256 mismatch); "
                                       f"moved to {aside}; rebuilding it\n")
    build_index(store, config)  # the stage rebuilds it under the same id; the catalog ignores the aside copy
    assert not plan_pipeline(store, config, ("rollout",)).missing("index")
    assert [(s.id, s.state) for s in store.scan()] == [(index.id, "complete")]


def test_a_truncated_manifest_of_a_needed_artifact_is_rebuilt_and_of_an_unneeded_one_named(home, config, capsys):
    store = ArtifactStore(home)
    build_index(store, config)
    index = plan_pipeline(store, config, ("index",)).ref("index")
    rollout = store.open(plan_pipeline(store, config, ("rollout",))["rollout"].plan).finish()
    (index.path / MANIFEST).write_text('{"stage": "index", "id"')
    plan = plan_pipeline(store, config, ("rollout",))  # rollout is built: the index is not needed
    assert not plan.missing("index") and not plan.missing("rollout") and index.path.is_dir()
    assert capsys.readouterr().err.startswith(f"warning: index/{index.id} is corrupt ({MANIFEST}: unreadable (")
    assert rollout == plan.ref("rollout")
    plan = plan_pipeline(store, config, ("index",))  # now it is the target
    assert plan.missing("index") and not index.path.exists()
    assert len(list((home / "index").glob(f"{index.id}.corrupt-*"))) == 1


def test_import_refuses_a_damaged_archive_and_files_that_do_not_match_their_manifest(tmp_path):
    source = ArtifactStore(tmp_path / "a")
    ref = adapter_like(source)
    archive = tmp_path / "train.tar.gz"
    export_artifact(source, ref.id, archive)
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(archive.read_bytes())
    flip_byte(damaged, damaged.stat().st_size // 2)
    target = ArtifactStore(tmp_path / "b")
    with pytest.raises(ArtifactError, match=f"{damaged}: not a readable .tar.gz export, or a damaged one \\(CRC check failed"):
        import_archive(target, damaged)
    # An archive whose gzip stream is intact but whose weights changed after the manifest was written.
    altered = tmp_path / "altered.tar.gz"
    with tarfile.open(archive, "r:gz") as old, tarfile.open(altered, "w:gz") as new:
        for member in old.getmembers():
            data = old.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("adapter_model.safetensors"):
                data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
            new.addfile(member, io.BytesIO(data) if data is not None else None)
    with pytest.raises(ArtifactError, match=f"{altered}: train/{ref.id} does not match its manifest "
                                            r"\(adapter/adapter_model.safetensors: sha256 mismatch\); not imported"):
        import_archive(target, altered)
    assert list((target.root / "train").iterdir()) == []  # the staging folder is gone, nothing half-imported
    assert import_archive(target, archive) == [(f"train/{ref.id}", "imported")]
    assert target.state(target.root / "train" / ref.id, hashes=True).state == "complete"


def test_export_refuses_a_corrupt_artifact(tmp_path):
    store = ArtifactStore(tmp_path / "a")
    ref = adapter_like(store)
    flip_byte(ref.path / "adapter" / "adapter_config.json", 3)
    with pytest.raises(ArtifactError, match=f"train/{ref.id} is corrupt .*adapter_config.json: sha256 mismatch"):
        export_artifact(store, ref.id, tmp_path / "out.tar.gz")
