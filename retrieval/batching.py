"""Dynamic micro-batching of search requests, with fair turns between small and large requests.

One thread owns the search backend (the embedder and FAISS are used by one thread at a time, as before).
Requests queue as jobs; the thread waits up to ``batch_wait_ms`` for more to arrive, then takes a batch
in turns: the job at the head of the line gives as many of its next queries as fit in the room left
(``max_batch_queries`` queries, ``max_batch_passages`` queries × topk, ``max_batch_chars`` query
characters); a job with queries left rejoins the line at its end once its chunk is searched, behind the
requests that arrived meanwhile. Each batch is one ``backend.search`` call with one topk per query (one
embedding call), and each job's results are handed to it chunk by chunk.

So 200 concurrent one-query requests cost a couple of batches, not 200 searches; and a request of a
thousand queries is searched a batch at a time, with any other request's queries in the next batch:
a small request waits for the batch in progress and then is in the next one, however large the others are.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from retrieval.retriever import Passage, SearchBackend
from services.metrics import Counter, Gauge, Histogram

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class BatchLimits:
    """The size of one batch, and how long to wait for it to fill."""

    max_queries: int
    max_passages: int
    max_chars: int
    wait_s: float


@dataclass(eq=False)
class SearchJob:
    """One request's queries. ``on_results(start, results)`` receives the results of queries
    ``start, start + 1, ...`` as each chunk is searched (in the batcher's thread); if it raises, the job
    fails with that error and its remaining queries are dropped. ``done`` resolves when all are delivered."""

    queries: list[str]
    k: int
    on_results: Callable[[int, list[list[Passage]]], None]
    done: Future = field(default_factory=Future)
    next: int = 0  # the first query not yet taken into a batch
    char_ends: list[int] = field(init=False)  # cumulative query lengths, to cut chunks by characters

    def __post_init__(self) -> None:
        self.char_ends = list(itertools.accumulate(len(q) for q in self.queries))

    def chars(self, start: int, stop: int) -> int:
        return self.char_ends[stop - 1] - (self.char_ends[start - 1] if start else 0)

    def fitting(self, queries: int, passages: int, chars: int) -> int:
        """How many of the next queries fit in this much room (0 when not even one does)."""
        count = min(len(self.queries) - self.next, queries, passages // self.k)
        used = self.char_ends[self.next - 1] if self.next else 0
        within_chars = bisect.bisect_right(self.char_ends, used + chars, self.next) - self.next
        return max(0, min(count, within_chars))


@dataclass(frozen=True)
class Chunk:
    """Queries ``start:stop`` of ``job``, taken into one batch."""

    job: SearchJob
    start: int
    stop: int


def take_batch(line: deque[SearchJob], limits: BatchLimits) -> list[Chunk]:
    """Take the next batch from the jobs waiting in ``line`` (mutates it; no clock, no threads).

    Jobs give chunks in line order, each as many of its next queries as fit in the room left, and leave the
    line; ``requeue`` puts those with queries left back at its end once their chunk has been searched, so a
    request that arrived meanwhile is ahead of them. The head job that does not fit keeps its place; the
    first chunk of a batch holds at least one query even when that query alone is over a limit.
    """
    batch: list[Chunk] = []
    room_queries, room_passages, room_chars = limits.max_queries, limits.max_passages, limits.max_chars
    while line and room_queries > 0:
        job = line[0]
        count = job.fitting(room_queries, room_passages, room_chars)
        if count == 0:
            if batch:
                break
            count = 1
        line.popleft()
        batch.append(Chunk(job, job.next, job.next + count))
        room_queries -= count
        room_passages -= count * job.k
        room_chars -= job.chars(job.next, job.next + count)
        job.next += count
    return batch


def requeue(line: deque[SearchJob], batch: list[Chunk]) -> None:
    """Put the jobs of a searched ``batch`` that have queries left (and have not failed) at the end of ``line``."""
    for chunk in batch:
        if chunk.job.next < len(chunk.job.queries) and not chunk.job.done.done():
            line.append(chunk.job)


class MicroBatcher:
    """Searches ``backend`` in a thread of its own, batching the jobs ``submit`` queues (see the module doc)."""

    def __init__(self, backend: SearchBackend, limits: BatchLimits):
        self.backend = backend
        self.limits = limits
        self._line: deque[SearchJob] = deque()
        self._searching: list[Chunk] = []  # the batch in progress (its jobs are out of the line meanwhile)
        self._closed = False
        self._wake = threading.Condition()
        self.batches = Histogram("retriever_batch_queries", "queries per batch searched", BATCH_BUCKETS)
        self.queries = Counter("retriever_queries_total", "queries searched")
        self.passages = Counter("retriever_passages_total", "passages found by searches")
        self.search_calls = Counter("retriever_search_calls_total", "backend searches (one embedding call each)")
        self.search_seconds = Counter("retriever_search_seconds_total", "seconds spent searching batches")
        self.pending = Gauge("retriever_pending_queries", "queries waiting to be searched")
        self._thread = threading.Thread(target=self._run, name="retriever-batcher", daemon=True)
        self._thread.start()

    def metrics(self) -> list:
        return [self.queries, self.passages, self.batches, self.search_calls, self.search_seconds, self.pending]

    def pending_queries(self) -> int:
        """Queries queued and not yet taken into a batch."""
        with self._wake:
            return self._count_pending()

    def submit(self, job: SearchJob) -> Future:
        """Queue ``job``; returns ``job.done``."""
        with self._wake:
            if self._closed:
                raise RuntimeError("the retrieval service is shutting down")
            self._line.append(job)
            self._count_pending()
            self._wake.notify()
        return job.done

    def close(self) -> None:
        """Stop the thread after the batch in progress; jobs still waiting fail."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)
        for job in self._line:
            self._fail(job, RuntimeError("the retrieval service is shutting down"))

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._line and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                deadline = time.monotonic() + self.limits.wait_s
                while self._count_pending() < self.limits.max_queries and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                self._searching = take_batch(self._line, self.limits)
            self._search(self._searching)
            with self._wake:
                requeue(self._line, self._searching)
                self._searching = []
                self._count_pending()

    def _count_pending(self) -> int:
        """Drop jobs that ended (cancelled) from the line; count the queries not yet taken into a batch,
        those of the jobs in the batch in progress included (holding _wake)."""
        for job in [job for job in self._line if job.done.done()]:
            self._line.remove(job)
        jobs = [*self._line, *(chunk.job for chunk in self._searching)]
        pending = sum(len(job.queries) - job.next for job in jobs)
        self.pending.set(pending)
        return pending

    def _search(self, batch: list[Chunk]) -> None:
        """Search ``batch`` in one backend call (one embedding call) and hand each job its chunk's results."""
        started = time.perf_counter()
        chunks = [chunk for chunk in batch if not chunk.job.done.done()]  # cancelled or failed: skipped
        queries = [q for chunk in chunks for q in chunk.job.queries[chunk.start : chunk.stop]]
        ks = [chunk.job.k for chunk in chunks for _ in range(chunk.stop - chunk.start)]
        self.batches.observe(len(queries))
        if not queries:
            return
        self.search_calls.inc()
        try:
            results = self.backend.search(queries, ks)
        except Exception as exc:  # noqa: BLE001 - the error is the answer of every request in the batch
            for chunk in chunks:
                self._fail(chunk.job, exc)
            return
        self.queries.inc(len(queries))
        self.passages.inc(sum(len(hits) for hits in results))
        offset = 0
        for chunk in chunks:
            self._deliver(chunk, results[offset : offset + chunk.stop - chunk.start])
            offset += chunk.stop - chunk.start
        self.search_seconds.inc(time.perf_counter() - started)

    def _deliver(self, chunk: Chunk, results: list[list[Passage]]) -> None:
        job = chunk.job
        try:
            job.on_results(chunk.start, results)
        except Exception as exc:  # noqa: BLE001 - a refused chunk (LimitExceeded) fails its request only
            self._fail(job, exc)
            return
        if chunk.stop == len(job.queries):
            with contextlib.suppress(InvalidStateError):  # cancelled meanwhile (the client went away)
                job.done.set_result(None)

    def _fail(self, job: SearchJob, exc: Exception) -> None:
        """End ``job`` with ``exc``; it is not requeued, so its remaining queries are never searched."""
        with contextlib.suppress(InvalidStateError):
            job.done.set_exception(exc)


