"""The run's scratch folder: made under $TMPDIR, shared with children, removed at exit; a killed run's
folder is swept by the next run, a live run's is kept, also when its pid was reused."""

import os
import signal
import subprocess
import sys
import textwrap

import psutil

from common.scratch import SCRATCH_VARIABLE, _start_time, sweep


def python(code: str, tmp, args: tuple[str, ...] = ()) -> subprocess.Popen:
    """``code`` in a new interpreter whose $TMPDIR is ``tmp`` and that inherits no scratch folder."""
    env = {key: value for key, value in os.environ.items() if key != SCRATCH_VARIABLE}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env={**env, "TMPDIR": str(tmp)},
                            stdout=subprocess.PIPE, text=True)


def test_sweep_removes_the_folders_of_dead_owners_and_keeps_the_live_ones(tmp_path):
    ended = psutil.Popen([sys.executable, "-c", "pass"])
    ended_start = _start_time(ended.pid)
    ended.wait()
    me = psutil.Process()
    my_start = _start_time(me.pid)
    dead = tmp_path / f"distillery-{ended.pid}-{ended_start}-0a1b"
    reused = tmp_path / f"distillery-{me.pid}-{my_start - 500}-0a1b"  # our pid, an earlier process's start
    live = tmp_path / f"distillery-{me.pid}-{my_start}-0a1b"
    others = [tmp_path / "distillery-sandbox-x1y2", tmp_path / "distillery-12-34"]  # not scratch folders
    for folder in (dead, reused, live, *others):
        (folder / "inside").mkdir(parents=True)
    assert sorted(sweep(tmp_path)) == sorted([dead, reused])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, *others))
    assert (live / "inside").is_dir()


def test_a_live_runs_folder_is_kept_when_the_wall_clock_moves(tmp_path, monkeypatch):
    """The boot time psutil adds to a start time follows the wall clock (/proc/stat's btime can move by a
    second under NTP or a VM's clock step); a live owner's folder must survive a sweep after such a step."""
    from psutil import _pslinux

    live = tmp_path / f"distillery-{os.getpid()}-{_start_time(os.getpid())}-0a1b"
    live.mkdir()
    real = _pslinux.boot_time
    for step in (-1.0, 1.0):
        monkeypatch.setattr(_pslinux, "boot_time", lambda step=step: real() + step)
        assert sweep(tmp_path) == [] and live.is_dir()


def test_scratch_is_shared_with_children_and_removed_at_exit(tmp_path):
    code = """
        import os, subprocess, sys
        from common.scratch import scratch_dir
        folder = scratch_dir()
        child = subprocess.run([sys.executable, "-c", "from common.scratch import scratch_dir; print(scratch_dir())"],
                               capture_output=True, text=True, check=True).stdout.strip()
        elsewhere = subprocess.run([sys.executable, "-c", "from common.scratch import scratch_dir; print(scratch_dir())"],
                                   capture_output=True, text=True, check=True,
                                   env={**os.environ, "TMPDIR": sys.argv[1]}).stdout.strip()
        print(folder, child, elsewhere, oct(folder.stat().st_mode & 0o777), os.listdir(os.environ["TMPDIR"]))
    """
    other = tmp_path / "other"
    tmp = tmp_path / "tmp"
    other.mkdir()
    tmp.mkdir()
    process = python(code, tmp, args=[str(other)])
    folder, child, elsewhere, mode, listed = process.communicate(timeout=60)[0].split(" ", 4)
    assert process.returncode == 0
    assert child == folder and folder.startswith(f"{tmp}/distillery-{process.pid}-")
    assert elsewhere.startswith(f"{other}/distillery-")  # a child given another $TMPDIR makes its own there
    assert list(other.iterdir()) == []  # and removes it at its exit
    assert mode == "0o711"  # the sandbox's actions (as nobody) pass through it to their own folder
    assert listed.strip() == repr([folder.rsplit("/", 1)[1]])  # the only folder made, while it ran
    assert list(tmp.iterdir()) == []


def test_a_killed_runs_folder_is_swept_by_the_next_run(tmp_path):
    killed = python("""
        import time
        from common.scratch import scratch_dir
        (scratch_dir() / "slot.bin").write_bytes(b"kv" * 1000)
        print("ready", flush=True)
        time.sleep(60)
    """, tmp_path)
    assert killed.stdout.readline() == "ready\n"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    [left] = tmp_path.iterdir()  # no exit handler ran
    assert (left / "slot.bin").is_file()
    rerun = python("from common.scratch import scratch_dir; print(scratch_dir().name)", tmp_path)
    made = rerun.communicate(timeout=60)[0].strip()
    assert rerun.returncode == 0 and made.startswith(f"distillery-{rerun.pid}-")
    assert list(tmp_path.iterdir()) == []  # the killed run's folder went at the re-run's start, its own at exit
