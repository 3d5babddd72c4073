"""Two runs on one home at once: two ``distillery rollout`` processes started together build each stage once
(one of them waits for the other's lock and reuses what it built), end with the same artifacts, and the
home holds one artifact per stage and every question's rows once.

Both processes use one Prefect API (the session's test server) rather than a temporary server each (~10 s
apiece on 2 cores); the lock does not involve Prefect (``storage.locks``).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flows_fixtures import write_rollout_config

from storage.catalog import query

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def rollout_config(tmp_path):
    # 0.5 s per question, 12 questions, one sandbox worker: the rollout takes ~7 s, longer than the two
    # processes' start-up times differ, so the second finds the first building it.
    return write_rollout_config(tmp_path, seconds=0.5, num_parts=3)


def start(home: Path, config: Path, api_url: str) -> subprocess.Popen:
    # The builder's lines are prints that Prefect turns into INFO records (log_prints); CI runs at WARNING.
    env = {**os.environ, "PREFECT_API_URL": api_url, "PYTHONPATH": str(ROOT), "PREFECT_LOGGING_LEVEL": "INFO"}
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "--home", str(home), "rollout", "--config",
                             str(config)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def test_two_runs_on_one_home_build_each_stage_once(home, rollout_config, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    runs = [start(home, rollout_config, PREFECT_API_URL.value()) for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    for run, output in zip(runs, outputs):
        assert run.returncode == 0, output
    results = [re.findall(r"^rollout [0-9a-f]{16} .*$", output, re.MULTILINE) for output in outputs]
    assert results[0] == results[1] and len(results[0]) == 1  # the same artifact

    ids = dict(query(home, "select stage, id from artifacts where state = 'complete'")[1])
    assert sorted(ids) == ["index", "rollout"]  # one artifact per stage
    assert query(home, "select count(*) from artifacts")[1] == [(2,)]
    for stage, id_ in ids.items():
        builders = [run.pid for run, output in zip(runs, outputs)
                    if f"building {stage}/{id_} (pid {run.pid})" in output]
        assert len(builders) == 1, f"{stage} built by {builders}"  # built once
    rollout = f"rollout/{ids['rollout']}"
    (builder,) = [run for run, output in zip(runs, outputs) if f"building {rollout}" in output]
    (waiter,) = [output for run, output in zip(runs, outputs) if run is not builder]
    assert f"waiting for {rollout} built by pid {builder.pid}" in waiter
    assert f"{rollout} was built meanwhile by pid {builder.pid}; reusing it" in waiter

    rows = query(home, "select count(*), count(distinct question_id), sum(correct::int) from episodes")[1]
    assert rows == [(12, 12, 12)]  # no question twice
    assert query(home, "select count(*), count(distinct question_id) from steps")[1] == [(12, 12)]
