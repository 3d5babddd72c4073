"""A full disk during a write: one named error (``DiskFull``, naming the file of the artifact), no half
artifact taken for complete, and a re-run with space finishes it with the numbers of a run that never ran
out, keeping the parts finished before.

The home is a small tmpfs mounted for the test (as root; the ``small_home`` fixture in tests/conftest.py);
where mounting is not allowed the tests are skipped with the reason.
"""

import pytest
from storage_fixtures import ROWS_PER_PART, episodes, plan, write_parts

from common.errors import DiskFull
from common.files import TMP_MARK, atomic_file
from storage.catalog import query
from storage.store import ArtifactStore
from tasks.artifacts import build_artifact

PARTS = 8
PREDICTION_BYTES = 8 * 1024  # 16 KiB of hex per row: 64 KiB per part, 512 KiB in all


def write(artifact):
    return write_parts(artifact, PARTS, PREDICTION_BYTES)


def reference_rows(tmp_path):
    """What the artifact holds when the disk never runs out."""
    ref = build_artifact(plan(tmp_path / "roomy", PARTS), write, "")
    return query(tmp_path / "roomy", "select question_id, prediction from episodes order by 1")[1], ref


def leftovers(folder):
    return sorted(p.name for p in folder.rglob(f"*{TMP_MARK}*"))


def test_a_part_that_hits_a_full_disk_is_one_named_error_and_a_rerun_with_space_finishes(small_home, tmp_path):
    store, ref = ArtifactStore(small_home.path), plan(small_home.path, PARTS).ref
    with pytest.raises(DiskFull) as error:
        build_artifact(plan(small_home.path, PARTS), write, "")
    finished = sorted(p.name for p in (ref.path / "episodes").iterdir())
    failed = f"part-{len(finished):05d}.parquet"
    assert 0 < len(finished) < PARTS
    assert str(error.value) == (f"no space left on device writing {ref.path}/episodes/{failed}; free space there "
                                "and run again (the files finished before are kept)")
    assert not store.exists(ref) and leftovers(ref.path) == []  # no manifest, no partial file
    assert query(small_home.path, "select state from artifacts")[1] == [("incomplete",)]
    assert query(small_home.path, "select count(*) from episodes")[1] == [(0,)]  # nothing half-built is read
    mtimes = {name: (ref.path / "episodes" / name).stat().st_mtime_ns for name in finished}

    small_home.grow()
    build_artifact(plan(small_home.path, PARTS), write, "")
    expected, roomy = reference_rows(tmp_path)
    assert roomy.id == ref.id
    assert query(small_home.path, "select question_id, prediction from episodes order by 1")[1] == expected
    assert len(expected) == PARTS * ROWS_PER_PART
    assert {name: (ref.path / "episodes" / name).stat().st_mtime_ns for name in finished} == mtimes
    assert store.manifest(ref)["files"] == ArtifactStore(tmp_path / "roomy").manifest(roomy)["files"]


def test_a_manifest_that_hits_a_full_disk_leaves_the_artifact_incomplete_until_a_rerun(small_home):
    store, ref = ArtifactStore(small_home.path), plan(small_home.path).ref

    def write_then_fill(artifact):
        written = write_parts(artifact)
        small_home.fill()  # the parts are on disk; the manifest finds no room
        return written

    with pytest.raises(DiskFull, match=f"writing {ref.path}/manifest.json;"):
        build_artifact(plan(small_home.path), write_then_fill, "")
    assert not store.exists(ref) and leftovers(ref.path) == []
    with pytest.raises(DiskFull, match="manifest.json"):  # still full: the same error, not one of the lock's
        build_artifact(plan(small_home.path), write_parts, "")
    (small_home.path / "filler").unlink()
    calls = []
    build_artifact(plan(small_home.path), lambda artifact: calls.append(1) or write_parts(artifact), "")
    assert calls == [1] and store.exists(ref)
    assert query(small_home.path, "select count(*), count(distinct question_id) from episodes")[1] == [(12, 12)]


def test_a_writer_that_does_not_say_why_it_failed_is_named_by_the_full_disk(small_home, tmp_path):
    """torch.save on a full disk raises RuntimeError('... unexpected pos 576 vs 534'): no errno, no words."""
    target = small_home.path / "adapter.bin"
    with pytest.raises(DiskFull, match="adapter.bin"), atomic_file(target):
        small_home.fill()
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert not target.exists()
    (small_home.path / "filler").unlink()
    # The same error with space left is not a full disk: it keeps its own type and message.
    with pytest.raises(RuntimeError, match="unexpected pos"), atomic_file(target) as partial:
        partial.write_bytes(episodes(0).to_string().encode())
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
