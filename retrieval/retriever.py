"""Search a passage index, in process or over HTTP, and format results for the agent's ``web_search`` tool.

Two implementations of one interface, ``search(queries, k) -> list[list[Passage]]`` (best first):
- ``Retriever``: a FAISS index + the passages table + the embedder, in this process (built by
  ``retrieval.index.load_index``).
- ``HttpRetriever``: a client of ``POST {url}/retrieve`` as served by ``retrieval.service`` or by
  Search-R1's own ``retrieval_server.py`` (so a prebuilt wiki-18 e5 server can stand in).

``web_search(retriever, query)`` renders the top 3 in the paper's tool-observation format::

    Retrieved documents:

    ===== Document 1, similarity: 0.83 =====
    "Title"
    text
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import ServiceUnavailable
from retrieval.corpus import join_contents, split_contents
from services.client import NoAnswer, Refused, ServiceClient
from storage.schemas import PASSAGES

if TYPE_CHECKING:
    import faiss

    from retrieval.embed import Embedder

PASSAGE_COLUMNS = tuple(PASSAGES.names)  # the columns a passages file must have (storage.schemas.PASSAGES)


@dataclass(frozen=True)
class Passage:
    """One retrieved passage; ``score`` is the inner product of unit vectors (cosine similarity)."""

    id: str
    title: str
    text: str
    score: float

    @property
    def contents(self) -> str:
        """The Search-R1 ``contents`` string: ``"Title"\\ntext``."""
        return join_contents(self.title, self.text)


class SearchBackend(Protocol):
    """Anything that answers batched top-k passage queries (in-process or remote); ``k`` is one number for
    all queries or one per query."""

    def search(self, queries: list[str], k: int | Sequence[int] = 3) -> list[list[Passage]]: ...


class RetrieverUnavailable(ServiceUnavailable, RuntimeError):
    """The remote retriever could not be reached or answered with an error."""


class PassageTable:
    """Random access to ``passages.parquet`` rows by FAISS id (row i ↔ vector i), without loading it whole.

    Reads only the row groups that hold requested rows and keeps the ``cache_row_groups`` most recently used
    ones, so a 21M-passage table costs memory in proportion to the cache, not to the corpus. Thread-safe.
    """

    def __init__(self, path: Path, cache_row_groups: int = 256):
        self.path = Path(path)
        self._file = pq.ParquetFile(self.path, memory_map=True, page_checksum_verification=True)
        missing = set(PASSAGE_COLUMNS) - set(self._file.schema_arrow.names)
        if missing:
            raise ValueError(f"{self.path}: passages table lacks column(s) {sorted(missing)}")
        meta = self._file.metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        self._cache_row_groups = cache_row_groups
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def rows(self, indices: np.ndarray) -> dict[int, tuple[str, str, str]]:
        """Map each requested row number to its (id, title, text)."""
        wanted = np.unique(np.asarray(indices, dtype=np.int64))
        if wanted.size and (wanted[0] < 0 or wanted[-1] >= len(self)):
            raise IndexError(f"{self.path}: row {int(wanted[-1])} out of range (table has {len(self)} rows)")
        groups = np.searchsorted(self._starts, wanted, side="right") - 1
        found: dict[int, tuple[str, str, str]] = {}
        with self._lock:
            for group in np.unique(groups):
                rows = wanted[groups == group]
                table = self._row_group(int(group)).take(pa.array(rows - self._starts[group]))
                columns = [table.column(name).to_pylist() for name in PASSAGE_COLUMNS]
                found.update(zip(rows.tolist(), zip(*columns)))
        return found

    def _row_group(self, group: int) -> pa.Table:
        if group in self._cache:
            self._cache.move_to_end(group)
            return self._cache[group]
        table = self._file.read_row_group(group, columns=list(PASSAGE_COLUMNS))
        self._cache[group] = table
        if len(self._cache) > self._cache_row_groups:
            self._cache.popitem(last=False)
        return table


class Retriever:
    """In-process dense retriever: embed queries, search FAISS, look passages up by row."""

    def __init__(self, index: faiss.Index, passages: PassageTable, embedder: Embedder, meta: dict):
        if index.ntotal != len(passages):
            raise ValueError(
                f"index holds {index.ntotal} vectors but {passages.path} has {len(passages)} rows"
            )
        if index.d != embedder.dim:
            raise ValueError(
                f"index dimension {index.d} != embedder {embedder.spec!r} dimension {embedder.dim}"
            )
        self.index = index
        self.passages = passages
        self.embedder = embedder
        self.meta = meta

    def search(self, queries: list[str], k: int | Sequence[int] = 3) -> list[list[Passage]]:
        """Top-``k`` passages per query, best first (fewer when the index holds fewer or IVF finds fewer).

        With one ``k`` per query, the queries are still embedded in one call (the service's batches mix
        requests); FAISS is searched once per distinct ``k``.
        """
        ks = _per_query(k, len(queries))
        if not queries:
            return []
        vectors = self.embedder.encode_queries(list(queries))
        ids = np.full((len(queries), max(ks)), -1, dtype=np.int64)  # FAISS pads missing hits with -1 too
        scores = np.zeros(ids.shape, dtype=np.float32)
        for k_value in sorted(set(ks)):
            rows = np.flatnonzero(np.asarray(ks) == k_value)
            found_scores, found_ids = self.index.search(vectors[rows], min(k_value, self.index.ntotal))
            ids[rows, : found_ids.shape[1]] = found_ids
            scores[rows, : found_ids.shape[1]] = found_scores
        rows = self.passages.rows(ids[ids >= 0])
        return [
            [Passage(*rows[int(i)], score=float(s)) for i, s in zip(id_row, score_row) if i >= 0]
            for id_row, score_row in zip(ids, scores)
        ]


class HttpRetriever:
    """Client of a Search-R1-compatible ``POST {url}/retrieve`` endpoint, with the ``Retriever`` interface.

    Requests go through ``services.client.ServiceClient``: a connection error, timeout or 5xx is tried
    ``retries`` more times (after ``retry_wait_s``, then twice that, ...), then RetrieverUnavailable.
    """

    def __init__(self, url: str, timeout_s: float = 60.0, retries: int = 2, retry_wait_s: float = 1.0):
        self.url = url.rstrip("/")
        self._service = ServiceClient(self.url, timeout_s=timeout_s, retries=retries, backoff_s=retry_wait_s)

    def search(self, queries: list[str], k: int | Sequence[int] = 3) -> list[list[Passage]]:
        """Top-``k`` passages per query from the server (one request per distinct ``k``); raises
        RetrieverUnavailable on failure."""
        ks = _per_query(k, len(queries))
        found: list[list[Passage]] = [[] for _ in queries]
        for k_value in sorted(set(ks)):
            rows = [i for i, k_i in enumerate(ks) if k_i == k_value]
            for row, passages in zip(rows, self._post([queries[i] for i in rows], k_value)):
                found[row] = passages
        return found

    def _post(self, queries: list[str], k: int) -> list[list[Passage]]:
        with self._unavailable():
            body = self._service.post("/retrieve", {"queries": list(queries), "topk": k, "return_scores": True})
        results = body.get("result") if isinstance(body, dict) else None
        if not isinstance(results, list) or len(results) != len(queries):
            raise RetrieverUnavailable(f"{self.url}/retrieve: unexpected response shape: {str(body)[:200]}")
        return [[_passage_from_hit(hit) for hit in hits] for hits in results]

    def health(self) -> dict:
        """The server's ``GET /health`` body."""
        with self._unavailable():
            return self._service.get("/health")

    def close(self) -> None:
        self._service.close()

    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        """The client's errors as RetrieverUnavailable (a ServiceUnavailable: tasks retry it)."""
        try:
            yield
        except NoAnswer as exc:
            raise RetrieverUnavailable(f"cannot reach the retriever at {exc.url} after {exc.attempts} "
                                       f"attempt(s): {exc.problem}") from None
        except Refused as exc:
            raise RetrieverUnavailable(f"the retriever {exc}") from None


def format_results(passages: list[Passage]) -> str:
    """The agent-facing observation: ``Retrieved documents:`` then one block per passage."""
    if not passages:
        return "Retrieved documents:\n\nNo documents found."
    blocks = [
        f"===== Document {i}, similarity: {p.score:.2f} =====\n{p.contents}"
        for i, p in enumerate(passages, start=1)
    ]
    return "Retrieved documents:\n\n" + "\n\n".join(blocks)


def web_search(retriever: SearchBackend, query: str, k: int = 3) -> str:
    """Search one query and format the top ``k`` for the agent (the paper's ``web_search`` tool)."""
    return format_results(retriever.search([query], k)[0])


def _per_query(k: int | Sequence[int], count: int) -> list[int]:
    """``k`` as one number per query; each must be ≥ 1."""
    ks = [k] * count if isinstance(k, int) else list(k)
    if len(ks) != count:
        raise ValueError(f"{len(ks)} values of k for {count} queries")
    if ks and min(ks) < 1:
        raise ValueError(f"k must be ≥ 1, got {min(ks)}")
    return ks


def _passage_from_hit(hit: object) -> Passage:
    """Parse one ``{"document": {"id", "contents"}, "score": s}`` item of a Search-R1 response."""
    try:
        document, score = hit["document"], float(hit["score"])
        title, text = split_contents(document["contents"])
        return Passage(id=str(document["id"]), title=title, text=text, score=score)
    except (TypeError, KeyError, ValueError):
        raise RetrieverUnavailable(f"unexpected hit in retriever response: {str(hit)[:200]}") from None
