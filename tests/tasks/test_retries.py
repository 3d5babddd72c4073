"""Prefect retries a stage task only for transient faults: a user error fails at once, a server that did
not answer, a full disk and any other exception keep their retry."""

import time

import pytest
from prefect import flow, task

from common.errors import DiskFull
from flows.stages import STAGES
from questions.datasets import DatasetError
from retrieval.retriever import RetrieverUnavailable
from tasks.evaluate import evaluate_shard, finish_evaluation
from tasks.retries import is_transient


def test_every_stage_task_with_retries_skips_them_for_user_errors():
    tasks = [entry.build() for entry in STAGES if entry.name != "evaluate"] + [evaluate_shard, finish_evaluation]
    retried = [t for t in tasks if t.retries]
    assert {t.name for t in retried} == {"index", "prefixes", "rollout", "opd", "evaluate-shard", "evaluate"}
    for stage_task in retried:
        assert stage_task.retries == 1 and stage_task.retry_condition_fn is is_transient, stage_task.name


@pytest.mark.parametrize("error, attempts", [
    (DatasetError("questions.jsonl:2: not valid JSON"), 1),
    (RetrieverUnavailable("cannot reach the retriever at http://127.0.0.1:9/retrieve"), 2),
    (DiskFull("no space left on device writing /home/rollout/0123456789abcdef/episodes/part-00001.parquet"), 2),
])
def test_user_errors_fail_at_once_and_transient_ones_are_retried(prefect_harness, error, attempts):
    calls = []

    @task(retries=1, retry_delay_seconds=10, retry_condition_fn=is_transient)
    def failing() -> None:
        calls.append(time.monotonic())
        raise error

    @flow
    def stage() -> None:
        failing()

    state = stage(return_state=True)
    assert state.is_failed() and str(error) in state.message
    assert len(calls) == attempts  # a user error: once, no retry after the 10 s delay
