"""One writer per artifact: a second writer waits for the holder of an artifact's lock and reuses what it
built; a holder killed with SIGKILL leaves a lock that is free at once, and the next writer takes the
artifact over, keeping the finished part. The holder is a real process (``storage_fixtures.hold``)."""

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from storage_fixtures import PARTS, ROWS_PER_PART, plan, write_parts

from storage.catalog import query
from storage.locks import LockTimeout, read_holder
from storage.store import LOCKS, ArtifactStore
from tasks.artifacts import build_artifact

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def holder(home, tmp_path):
    """A process building the test artifact, holding its lock after part 0 until ``release`` exists."""
    control = tmp_path / "control"
    control.mkdir()
    process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("storage_fixtures.py")), str(home),
                                str(control)], env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (control / "holding").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.05)
    yield process, control / "release"
    if process.poll() is None:
        process.kill()
    process.wait()


def counting(calls: list):
    def write(artifact):
        calls.append(artifact.ref.id)
        return write_parts(artifact)
    return write


def lock_path(ref) -> Path:
    return Path(ref.root) / LOCKS / ref.stage / f"{ref.id}.lock"


def assert_rows_once(home, ref):
    rows = query(home, "select count(*), count(distinct question_id) from episodes")[1]
    assert rows == [(PARTS * ROWS_PER_PART, PARTS * ROWS_PER_PART)]
    assert ArtifactStore(home).manifest(ref)["row_counts"] == {"episodes": PARTS * ROWS_PER_PART}


def test_a_second_writer_waits_for_the_holder_and_reuses_what_it_built(home, holder, capsys):
    process, release = holder
    ref = plan(home).ref
    assert read_holder(lock_path(ref))["pid"] == process.pid  # the holder names itself in the lock file
    threading.Timer(1.0, release.touch).start()
    calls = []
    assert build_artifact(plan(home), counting(calls), "") == ref
    assert process.wait(timeout=30) == 0
    assert calls == []  # built once, by the holder
    err = capsys.readouterr().err
    assert f"waiting for rollout/{ref.id} built by pid {process.pid} on {socket.gethostname()} since" in err
    assert f"rollout/{ref.id} was built meanwhile by pid {process.pid}; reusing it" in err
    assert_rows_once(home, ref)
    assert lock_path(ref).read_text() == ""  # released: no holder named


def test_a_writer_killed_holding_the_lock_is_taken_over_and_its_finished_part_kept(home, holder, capsys):
    process, _ = holder
    ref = plan(home).ref
    first_part = ref.path / "episodes" / "part-00000.parquet"
    mtime = first_part.stat().st_mtime_ns
    threading.Timer(1.0, process.kill).start()
    calls = []
    started = time.monotonic()
    build_artifact(plan(home), counting(calls), "")
    # The kernel released the dead holder's lock: the waiter noticed within a poll or two of the kill.
    # (~1.2 s idle; without the takeover it would wait for the lock timeout)
    assert time.monotonic() - started < 1.0 + 30.0
    assert process.wait() == -9
    assert calls == [ref.id]  # the next writer built it ...
    assert first_part.stat().st_mtime_ns == mtime  # ... keeping the part the killed one had finished
    err = capsys.readouterr().err
    assert f"waiting for rollout/{ref.id} built by pid {process.pid}" in err
    assert f"building rollout/{ref.id} (pid {os.getpid()})" in err
    assert_rows_once(home, ref)


def test_a_live_holder_keeps_its_lock_a_dead_one_does_not(home, holder):
    process, _ = holder
    store, ref = ArtifactStore(home), plan(home).ref
    with pytest.raises(LockTimeout, match=f"rollout/{ref.id} is being built by pid {process.pid} on .*; gave up "
                                          "waiting after 0.5 s"), store.lock(ref, timeout_s=0.5):
        pass
    process.kill()
    process.wait()
    # The dead holder's name is still in the file (it had no chance to clear it), but its lock is gone.
    assert read_holder(lock_path(ref))["pid"] == process.pid
    with store.lock(ref, timeout_s=0) as waited_for:
        assert waited_for is None
        assert read_holder(lock_path(ref))["pid"] == os.getpid()
    assert not store.exists(ref)  # nothing was finished: the next build resumes from part 0


def test_taking_a_lock_this_process_holds_is_an_error_not_a_hang(home):
    store, ref = ArtifactStore(home), plan(home).ref
    with store.lock(ref), pytest.raises(RuntimeError, match="already holds its lock"), store.lock(ref):
        pass
