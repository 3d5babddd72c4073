"""Prefect retries a stage task only for transient faults: a user error fails at once, a server that did
not answer and any other exception keep their retry."""

import time

import pytest
from prefect import flow, task

from questions.datasets import DatasetError
from retrieval.retriever import RetrieverUnavailable
from tasks.evaluate import evaluate_shard
from tasks.index import build_index
from tasks.prefixes import build_prefixes
from tasks.retries import is_transient
from tasks.rollout import run_rollouts


def test_every_stage_task_with_retries_skips_them_for_user_errors():
    for stage_task in (build_index, build_prefixes, run_rollouts, evaluate_shard):
        assert stage_task.retries >= 1 and stage_task.retry_condition_fn is is_transient, stage_task.name


@pytest.mark.parametrize("error, attempts", [
    (DatasetError("questions.jsonl:2: not valid JSON"), 1),
    (RetrieverUnavailable("cannot reach the retriever at http://127.0.0.1:9/retrieve"), 2),
    (OSError("No space left on device"), 2),
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

    started = time.monotonic()
    state = stage(return_state=True)
    assert state.is_failed() and str(error) in state.message
    assert len(calls) == attempts
    if attempts == 1:
        assert time.monotonic() - started < 8  # not after the 10 s retry delay
