"""The artifact store: ids, manifests last, atomic parts, crash safety, concurrency, lineage."""

import hashlib
import json
import multiprocessing as mp
import os

import pyarrow as pa
import pytest

from storage.catalog import open_catalog, query, read_table
from storage.schemas import EPISODES, conform
from storage.store import MANIFEST, ArtifactError, ArtifactStore, artifact_id


def episode_rows(question_ids, dataset="d"):
    return pa.Table.from_pylist([{"question_id": q, "dataset": dataset, "correct": True} for q in question_ids])


def test_ids_are_content_hashes():
    a = artifact_id("index", {"k": 1}, ["p2", "p1"], "v1")
    assert a == artifact_id("index", {"k": 1}, ["p1", "p2"], "v1")  # parent order does not matter
    assert a != artifact_id("index", {"k": 2}, ["p1", "p2"], "v1")
    assert a != artifact_id("index", {"k": 1}, ["p1", "p2"], "v2")
    assert a != artifact_id("rollout", {"k": 1}, ["p1", "p2"], "v1")
    assert len(a) == 16 and int(a, 16) >= 0


def test_manifest_is_written_last_and_makes_the_artifact_visible(home):
    store = ArtifactStore(home)
    art = store.begin("rollout", {"n": 2}, ["parent0"])
    art.write_table("episodes", episode_rows(["q1", "q2"]), EPISODES, part=0)
    assert not store.exists(art.ref)
    assert query(home, "select count(*) from episodes")[1] == [(0,)]
    assert query(home, "select id, state, created from artifacts")[1] == [(art.ref.id, "incomplete", None)]
    art.finish({"episodes": 2}, {"accuracy": 1.0})
    manifest = json.loads((art.path / MANIFEST).read_text())
    assert manifest["stage"] == "rollout" and manifest["id"] == art.ref.id
    assert manifest["parents"] == ["parent0"] and manifest["row_counts"] == {"episodes": 2}
    assert manifest["config"] == {"n": 2} and manifest["code_version"] and manifest["created"]
    part = art.path / "episodes" / "part-00000.parquet"
    assert manifest["files"] == {"episodes/part-00000.parquet": {
        "sha256": hashlib.sha256(part.read_bytes()).hexdigest(), "bytes": part.stat().st_size}}
    assert query(home, "select state, problem from artifacts")[1] == [("complete", None)]
    assert query(home, "select question_id, stage, artifact_id from episodes order by 1")[1] == [
        ("q1", "rollout", art.ref.id), ("q2", "rollout", art.ref.id)]


def test_writers_cast_to_the_schema_and_reject_unknown_columns(home):
    table = conform(episode_rows(["q1"]), EPISODES)
    assert table.schema == EPISODES and table.column("num_steps").null_count == 1
    with pytest.raises(ValueError, match="not in the schema"):
        conform(pa.table({"question_id": ["q"], "bogus": [1]}), EPISODES)


def test_lineage_and_listing(home):
    store = ArtifactStore(home)
    index = store.begin("index", {"a": 1}).finish()
    traj = store.begin("rollout", {"b": 1}, [index.id]).finish()
    adapter = store.begin("train", {"c": 1}, [traj.id]).finish()
    assert [m["id"] for m in store.lineage(adapter.id)] == [adapter.id, traj.id, index.id]
    assert [m["stage"] for m in store.list("train")] == ["train"]
    assert store.resolve(adapter.id[:8]) == adapter
    with pytest.raises(ArtifactError, match="no complete artifact"):
        store.manifest("deadbeef")
    rows = query(home, "select stage, parents from artifacts where stage = 'train'")[1]
    assert rows == [("train", [traj.id])]


def _die_mid_write(root):
    """Write one part, start a second one and die without cleanup, as a SIGKILL would."""
    import pyarrow.parquet as pq

    store = ArtifactStore(root)
    art = store.begin("rollout", {"crash": True})
    art.write_table("episodes", episode_rows(["q1"]), EPISODES, part=0)
    real_write = pq.write_table

    def write_then_die(table, where, **kw):
        real_write(table, where, **kw)
        os._exit(17)  # after the temp file is written, before os.replace and before the manifest

    pq.write_table = write_then_die
    art.write_table("episodes", episode_rows(["q2"]), EPISODES, part=1)


def test_writer_killed_mid_write_leaves_nothing_visible_and_next_write_succeeds(home):
    child = mp.get_context("spawn").Process(target=_die_mid_write, args=(str(home),))
    child.start()
    child.join(60)
    assert child.exitcode == 17
    store = ArtifactStore(home)
    folder = next((home / "rollout").iterdir())
    assert not (folder / MANIFEST).exists()
    assert any(".tmp-" in p.name for p in (folder / "episodes").iterdir())  # the torn temp file is there
    assert query(home, "select count(*) from episodes")[1] == [(0,)]
    assert query(home, "select state from artifacts")[1] == [("incomplete",)]
    # The next writer resumes the same artifact: the stale temp file is cleaned, part 0 is kept.
    art = store.begin("rollout", {"crash": True})
    assert not any(".tmp-" in p.name for p in (folder / "episodes").iterdir())
    art.write_table("episodes", episode_rows(["q2"]), EPISODES, part=1)
    art.finish({"episodes": 2})
    assert query(home, "select question_id from episodes order by 1")[1] == [("q1",), ("q2",)]


def _write_parts(root, parts):
    store = ArtifactStore(root)
    art = store.begin("rollout", {"shared": True})
    for part in parts:
        art.write_table("episodes", episode_rows([f"q{part}-{i}" for i in range(50)]), EPISODES, part=part)


def test_two_processes_writing_parts_of_one_table_lose_no_rows(home):
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_write_parts, args=(str(home), range(start, 40, 2))) for start in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    ArtifactStore(home).begin("rollout", {"shared": True}).finish()
    assert query(home, "select count(*), count(distinct question_id) from episodes")[1] == [(2000, 2000)]


def test_a_retried_part_replaces_itself(home):
    art = ArtifactStore(home).begin("rollout", {"retry": True})
    art.write_table("episodes", episode_rows(["a", "b"]), EPISODES, part=3)
    art.write_table("episodes", episode_rows(["a", "b"]), EPISODES, part=3)
    art.finish()
    assert query(home, "select count(*) from episodes")[1] == [(2,)]


def test_truncated_parquet_is_skipped_with_a_warning_naming_it(home):
    art = ArtifactStore(home).begin("rollout", {"t": 1})
    good = art.write_table("episodes", episode_rows(["q1"]), EPISODES, part=0)
    bad = art.write_table("episodes", episode_rows(["q2"]), EPISODES, part=1)
    art.finish()
    bad_bytes = bad.read_bytes()
    bad.write_bytes(bad_bytes[:50])  # truncate
    warnings = []
    con = open_catalog(home, warn=warnings.append)
    assert con.execute("select question_id from episodes").fetchall() == [("q1",)]
    assert warnings == [(f"corrupt artifact rollout/{art.ref.id} ({art.path}): episodes/part-00001.parquet: size 50 "
                        f"bytes, the manifest says {len(bad_bytes)}; its damaged Parquet files are skipped")]
    assert con.execute("select state from artifacts").fetchall() == [("corrupt",)]
    with pytest.raises(ArtifactError, match=str(bad)):
        read_table(art.path, "episodes")
    assert good.exists()


def test_every_view_exists_with_its_columns_on_an_empty_home(home):
    con = open_catalog(home)
    for view in ("artifacts", "episodes", "steps", "predictions", "metrics", "passages"):
        assert con.execute(f"select count(*) from {view}").fetchone() == (0,)
    columns = [d[0] for d in con.execute("select * from episodes").description]
    assert columns[:3] == ["dataset", "question_id", "sample_index"] and "artifact_id" in columns


def test_atomic_file_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    from common.files import atomic_file

    target = tmp_path / "out" / "plot.png"
    with atomic_file(target, suffix=".png") as temporary:
        assert temporary.suffix == ".png" and temporary.parent == target.parent
        temporary.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError), atomic_file(target) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"new" and sorted(p.name for p in target.parent.iterdir()) == ["plot.png"]


def test_atomic_dir_replaces_a_folder_or_keeps_one_another_writer_finished_first(tmp_path):
    from common.files import atomic_dir

    target = tmp_path / "model"
    with atomic_dir(target) as folder:
        (folder / "a").write_text("first")
    with atomic_dir(target) as folder:
        (folder / "b").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    with atomic_dir(target, replace=False) as folder:
        (folder / "c").write_text("late")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
