"""The micro-batcher: which queries go into which batch, and what each request gets back (no model: a fake
backend that answers each query with passages named after it and records every call)."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import wait

import pytest

from retrieval.batching import BatchLimits, MicroBatcher, SearchJob, requeue, take_batch
from retrieval.retriever import Passage

LIMITS = BatchLimits(max_queries=4, max_passages=12, max_chars=40, wait_s=0.005)


class RecordingBackend:
    """Answers query q with passages "q#0", "q#1", ...; records each call; can be held or made to fail."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[list[str], int]] = []
        self.fail_on = fail_on
        self.gate = threading.Event()  # cleared: searches wait for it (to queue jobs behind a batch)
        self.gate.set()
        self.entered = threading.Event()  # set once a search has started

    def search(self, queries: list[str], k: list[int]) -> list[list[Passage]]:
        self.entered.set()
        self.gate.wait(10)
        self.calls.append((list(queries), list(k)))
        if self.fail_on in queries:
            raise RuntimeError(f"index broke on {self.fail_on}")
        return [[Passage(f"{q}#{i}", q, "text", 1.0 - i / 10) for i in range(k_q)] for q, k_q in zip(queries, k)]


class Collected:
    """The ``on_results`` of a job: each query's passage ids, in query order."""

    def __init__(self, count: int):
        self.ids: list[list[str] | None] = [None] * count

    def __call__(self, start: int, results: list[list[Passage]]) -> None:
        for i, passages in enumerate(results, start):
            self.ids[i] = [p.id for p in passages]


def job(queries: list[str], k: int = 1) -> SearchJob:
    return SearchJob(list(queries), k, Collected(len(queries)))


def taken(batch) -> list[tuple[str, int, int]]:
    return [(chunk.job.queries[0], chunk.start, chunk.stop) for chunk in batch]


def next_batch(line: deque[SearchJob]) -> list[tuple[str, int, int]]:
    """Take a batch and requeue its jobs, as the batcher does once the batch is searched."""
    batch = take_batch(line, LIMITS)
    requeue(line, batch)
    return taken(batch)


def test_jobs_take_turns_and_a_job_with_queries_left_rejoins_the_line_at_its_end():
    big = job([f"b{i}" for i in range(10)])
    line = deque([big, job(["s1"])])
    first = take_batch(line, LIMITS)
    assert taken(first) == [("b0", 0, 4)]  # the head fills the batch: 4 queries
    line.append(job(["s2"]))  # arrives while the first batch is searched: ahead of the big job's next turn
    requeue(line, first)
    assert next_batch(line) == [("s1", 0, 1), ("s2", 0, 1), ("b0", 4, 6)]
    assert next_batch(line) == [("b0", 6, 10)]
    assert not line


def test_a_batch_stops_at_the_passage_and_character_limits():
    line = deque([job(["q1", "q2", "q3"], k=5)])  # 3 × 5 passages > 12: two queries fit
    assert taken(take_batch(line, LIMITS)) == [("q1", 0, 2)]
    long = ["x" * 15, "y" * 15, "z" * 15]  # 45 characters > 40: two fit
    line = deque([job(long)])
    assert [(c.start, c.stop) for c in take_batch(line, LIMITS)] == [(0, 2)]
    # A job that does not fit in the room left keeps its place at the head for the next batch.
    line = deque([job(["a", "b", "c"]), job(["d" * 39])])
    assert taken(take_batch(line, LIMITS)) == [("a", 0, 3)]
    assert [(c.start, c.stop) for c in take_batch(line, LIMITS)] == [(0, 1)]


def test_one_query_over_a_batch_limit_is_searched_alone():
    line = deque([job(["x" * 100]), job(["y"])])
    assert [(c.start, c.stop) for c in take_batch(line, LIMITS)] == [(0, 1)]
    assert taken(take_batch(line, LIMITS)) == [("y", 0, 1)]


def test_concurrent_single_queries_share_batches_and_each_gets_its_own_results():
    backend = RecordingBackend()
    backend.gate.clear()  # hold the first batch until all 40 jobs are queued
    batcher = MicroBatcher(backend, BatchLimits(max_queries=16, max_passages=100, max_chars=1000, wait_s=0.005))
    jobs = [job([f"q{i}"], k=2) for i in range(40)]
    futures = [batcher.submit(j) for j in jobs]
    backend.gate.set()
    wait(futures, timeout=10)
    batcher.close()
    assert [j.on_results.ids for j in jobs] == [[[f"q{i}#0", f"q{i}#1"]] for i in range(40)]
    # The first batch may hold the first job alone (it started before the others arrived); then 16 a batch.
    assert len(backend.calls) <= 4 and all(len(queries) <= 16 for queries, _ in backend.calls)
    assert sorted(q for queries, _ in backend.calls for q in queries) == sorted(f"q{i}" for i in range(40))
    assert batcher.batches.count == len(backend.calls) and batcher.queries.value() == 40


def test_a_small_request_is_answered_between_the_batches_of_a_large_one():
    backend = RecordingBackend()
    backend.gate.clear()
    batcher = MicroBatcher(backend, LIMITS)
    big = job([f"b{i}" for i in range(20)])
    big_done = batcher.submit(big)
    small = job(["s"])
    small_done = batcher.submit(small)
    backend.gate.set()
    small_done.result(timeout=10)
    big_done.result(timeout=10)
    batcher.close()
    searched = [queries for queries, _ in backend.calls]
    assert searched[0] == ["b0", "b1", "b2", "b3"]
    assert searched[1][0] == "s"  # the second batch: the small request first, then the large one's next queries
    assert big.on_results.ids == [[f"b{i}#0"] for i in range(20)]


def test_a_batch_is_one_search_call_with_each_query_s_topk():
    backend = RecordingBackend()
    backend.gate.clear()
    batcher = MicroBatcher(backend, BatchLimits(max_queries=16, max_passages=100, max_chars=1000, wait_s=0.005))
    first = batcher.submit(job(["warm"]))
    assert backend.entered.wait(10)  # the first batch is being searched: the next jobs form the second
    futures = [batcher.submit(job([f"q{i}"], k=1 + i % 2)) for i in range(6)]
    backend.gate.set()
    wait([first, *futures], timeout=10)
    batcher.close()
    assert backend.calls[1:] == [([f"q{i}" for i in range(6)], [1, 2, 1, 2, 1, 2])]  # the second batch


def test_a_failed_search_fails_only_the_requests_in_its_batch():
    backend = RecordingBackend(fail_on="bad")
    backend.gate.clear()
    batcher = MicroBatcher(backend, LIMITS)
    bad = batcher.submit(job(["bad", "b2", "b3", "b4", "b5"]))  # its second chunk is never searched
    backend.gate.set()
    with pytest.raises(RuntimeError, match="index broke on bad"):
        bad.result(timeout=10)
    good = job(["fine"])
    batcher.submit(good).result(timeout=10)
    batcher.close()
    assert good.on_results.ids == [["fine#0"]]
    assert [queries for queries, _ in backend.calls] == [["bad", "b2", "b3", "b4"], ["fine"]]


def test_a_job_whose_results_are_refused_stops_and_the_rest_of_it_is_not_searched():
    backend = RecordingBackend()
    backend.gate.clear()
    batcher = MicroBatcher(backend, LIMITS)

    def refuse(start, results):
        raise ValueError("response too large")

    refused = batcher.submit(SearchJob([f"r{i}" for i in range(12)], 1, refuse))
    backend.gate.set()
    with pytest.raises(ValueError, match="response too large"):
        refused.result(timeout=10)
    batcher.submit(job(["after"])).result(timeout=10)
    batcher.close()
    assert [queries for queries, _ in backend.calls] == [["r0", "r1", "r2", "r3"], ["after"]]
    assert batcher.pending_queries() == 0
