"""Build, import and load dense passage indexes (FAISS, inner product over unit vectors = cosine).

An index directory holds (the artifact store adds ``manifest.json`` last):
- ``faiss.index``: vector i is passage row i;
- ``passages.parquet``: columns ``id, title, text`` in FAISS id order, row groups of 2,048;
- ``index_meta.json``: embedder, dim, prefixes, index type, count, corpus fingerprint, build figures.

Index types are FAISS factory strings: ``Flat`` (exact), ``IVF{nlist},Flat``, ``IVF{nlist},PQ{m}``,
``HNSW{M}``. Benchmarked settings (bench/retrieval.py, 200k synthetic vectors shaped by vital-articles
embeddings): ``IVF1024,Flat`` with nprobe 32 and ``HNSW32`` with ef_search 128 (the defaults) reached
Recall@10 0.999 and 0.996 against Flat, ~2x and ~5x faster on 1,000 batched queries.
GPUs (faiss-gpu): the index is cloned to all GPUs (replicas, or shards with ``gpu_shard``; fp16 with
``gpu_fp16``) and checked with a one-vector probe search; when that fails (e.g. HNSW has no GPU version)
it stays on CPU and a warning says so.

    manifest = build_index(IndexConfig(), out_dir)      # the vital-articles corpus with MiniLM, Flat
    retriever = load_index(out_dir, embedder="minilm-l6-v2")
    retriever.search(["who painted the Mona Lisa?"], k=3)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from common.errors import UserError
from common.files import atomic_file
from devices.precision import Dtype
from retrieval.corpus import CorpusConfig, CorpusStats, corpus_fingerprint, iter_passages, join_contents
from retrieval.embed import Embedder
from retrieval.retriever import PassageTable, Retriever
from storage.schemas import PASSAGES

if TYPE_CHECKING:
    import faiss  # imported where used: it takes seconds to load

logger = logging.getLogger(__name__)

INDEX_FILE = "faiss.index"
PASSAGES_FILE = "passages.parquet"
META_FILE = "index_meta.json"
META_VERSION = 1
ROW_GROUP_ROWS = 2048


class IndexConfig(BaseModel):
    """How to embed a corpus and which FAISS index to build and search."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus: CorpusConfig = Field(CorpusConfig(), description="the corpus to index")
    embedder: str = Field(
        "minilm-l6-v2", description="sentence-transformers model spec (embedded name or path)"
    )
    index_type: str = Field(
        "Flat", description="FAISS factory string: Flat, IVF{nlist},Flat, IVF{n},PQ{m}, HNSW{M}"
    )
    nprobe: int = Field(32, ge=1, description="IVF: inverted lists visited per query")
    ef_search: int = Field(128, ge=1, description="HNSW: candidate list size per query")
    train_vectors: int = Field(131072, ge=1, description="IVF/PQ: first N vectors used for k-means training")
    # 32 on CPU: bigger batches make each activation a fresh mmap (page faults, ~10% more CPU time).
    batch_size: int = Field(
        32, ge=1, description="texts per embedding forward pass (32 for CPU; 256+ on a GPU)"
    )
    encode_chunk: int = Field(2048, ge=1, description="passages read, embedded and written per step")
    device: str = Field("auto", description="embedding device: auto (CUDA when present), cpu, cuda, cuda:1")
    precision: Dtype = Field(
        "auto", description="embedding precision (autocast): auto = bfloat16 on CPUs with native bf16, float16 "
                            "on CUDA, else float32; or float32, bfloat16, float16")
    use_gpu: bool = Field(True, description="put the FAISS index on the GPUs when there are any")
    gpu_fp16: bool = Field(False, description="store GPU index vectors in float16 (half the memory)")
    gpu_shard: bool = Field(False, description="split the index across GPUs instead of replicating it")


class IndexArtifactError(UserError, ValueError):
    """An index directory is missing, incomplete, or does not match the configured embedder."""


class IndexBuildError(UserError, ValueError):
    """The index cannot be built as configured (bad index type, too few vectors to train)."""


def build_index(cfg: IndexConfig, out_dir: Path, progress: bool = True) -> dict:
    """Embed ``cfg.corpus`` and write ``faiss.index``, ``passages.parquet`` and ``index_meta.json`` into ``out_dir``.

    Files are written under temporary names and renamed at the end; on any error nothing is left behind.
    Returns the manifest fields (corpus_fingerprint, embedder, dim, count, index_type, build_seconds, bad_lines, …).
    """
    started = time.perf_counter()
    fingerprint = corpus_fingerprint(cfg.corpus)  # fails fast on a missing corpus, before loading a model
    embedder = Embedder(cfg.embedder, cfg.device, cfg.batch_size, cfg.precision)
    index = new_faiss_index(cfg.index_type, embedder.dim)
    stats = CorpusStats()
    with _staged(Path(out_dir)) as tmp:
        with pq.ParquetWriter(tmp[PASSAGES_FILE], PASSAGES, compression="zstd", write_page_checksum=True) as writer:
            index = _embed_into(cfg, embedder, index, iter_passages(cfg.corpus, stats), writer, progress)
        faiss_write(index, tmp[INDEX_FILE])
        meta = _index_meta(embedder, cfg.index_type, index, fingerprint, cfg.corpus, stats, started)
        tmp[META_FILE].write_text(json.dumps(meta, indent=2))
    return meta


def import_index(faiss_path: Path, corpus: CorpusConfig, embedder: str, out_dir: Path) -> dict:
    """Adopt a prebuilt FAISS index (e.g. Search-R1's wiki-18 ``e5_Flat.index``) and its corpus.

    The corpus is copied to ``passages.parquet`` in its own order, which must be the index's id order;
    no chunking is applied (set ``corpus.chunk_words`` ≥ the longest passage, or passages get split and the
    count check fails). The embedder is loaded to check its dimension and record its prefixes.
    """
    import faiss

    started = time.perf_counter()
    if not Path(faiss_path).is_file():
        raise IndexArtifactError(f"FAISS index file not found: {faiss_path}")
    # Memory-mapped: only the header is needed here, and wiki-18's e5 Flat index is ~60 GB.
    index = faiss.read_index(str(faiss_path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    model = Embedder(embedder, device="cpu")
    if model.dim != index.d:
        raise IndexArtifactError(
            f"{faiss_path} has dimension {index.d} but embedder {embedder!r} has {model.dim}"
        )
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexArtifactError(
            f"{faiss_path} does not use inner-product similarity; only such indexes are served"
        )
    stats = CorpusStats()
    with _staged(Path(out_dir)) as tmp:
        with pq.ParquetWriter(tmp[PASSAGES_FILE], PASSAGES, compression="zstd", write_page_checksum=True) as writer:
            for rows in _batched(iter_passages(corpus, stats), ROW_GROUP_ROWS):
                writer.write_table(pa.Table.from_pylist(rows, PASSAGES))
        if stats.passages != index.ntotal:
            raise IndexArtifactError(
                f"{faiss_path} holds {index.ntotal} vectors but the corpus {corpus.source} gives {stats.passages} "
                "passages; they must match one to one (same corpus file, no chunking, no skipped lines)"
            )
        if os.stat(faiss_path).st_dev == os.stat(out_dir).st_dev:
            tmp[INDEX_FILE].unlink()  # the link takes the temporary name
            os.link(faiss_path, tmp[INDEX_FILE])  # a hard link: no copy of a 60 GB index
        else:
            shutil.copyfile(faiss_path, tmp[INDEX_FILE])
        index_type = f"imported:{type(index).__name__}"
        meta = _index_meta(model, index_type, index, corpus_fingerprint(corpus), corpus, stats, started)
        tmp[META_FILE].write_text(json.dumps(meta, indent=2))
    return meta


def read_index_meta(index_dir: Path) -> dict:
    """The ``index_meta.json`` of an index directory; IndexArtifactError when absent or unreadable."""
    path = Path(index_dir) / META_FILE
    if not path.is_file():
        raise IndexArtifactError(
            f"{index_dir} is not a complete index: {META_FILE} is missing (build it first)"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IndexArtifactError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if meta.get("format_version") != META_VERSION:
        raise IndexArtifactError(
            f"{path}: format_version {meta.get('format_version')!r}, expected {META_VERSION}"
        )
    return meta


def load_index(
    index_dir: Path,
    embedder: str,
    *,
    device: str = "auto",
    batch_size: int = 32,
    precision: Dtype = "auto",
    use_gpu: bool = True,
    gpu_fp16: bool = False,
    gpu_shard: bool = False,
    nprobe: int = 32,
    ef_search: int = 128,
) -> Retriever:
    """Open an index directory as an in-process Retriever.

    Refuses (IndexArtifactError) when the index was built with another embedder than ``embedder``, or when
    the loaded model's dimension or query/passage prefixes differ from those the index was built with.
    """
    import faiss

    index_dir = Path(index_dir)
    meta = read_index_meta(index_dir)
    if meta["embedder"] != embedder:
        raise IndexArtifactError(
            f"index {index_dir} was built with embedder {meta['embedder']!r}, but the configured embedder is "
            f"{embedder!r}: queries would be embedded in a different space. Rebuild the index with {embedder!r} "
            f"or configure embedder={meta['embedder']!r}."
        )
    for name in (INDEX_FILE, PASSAGES_FILE):
        if not (index_dir / name).is_file():
            raise IndexArtifactError(f"{index_dir} is not a complete index: {name} is missing")
    model = Embedder(embedder, device, batch_size, precision)
    built_with = (meta["dim"], meta["query_prefix"], meta["passage_prefix"])
    if (model.dim, model.query_prefix, model.passage_prefix) != built_with:
        raise IndexArtifactError(
            f"embedder {embedder!r} now gives (dim, query prefix, passage prefix) = "
            f"{(model.dim, model.query_prefix, model.passage_prefix)!r}, but {index_dir} was built with {built_with!r}"
        )
    index = faiss.read_index(str(index_dir / INDEX_FILE))
    set_search_params(index, nprobe=nprobe, ef_search=ef_search)  # before cloning: GPU clones copy nprobe
    if use_gpu:
        index = to_gpus(index, fp16=gpu_fp16, shard=gpu_shard)
    return Retriever(index, PassageTable(index_dir / PASSAGES_FILE), model, meta)


def new_faiss_index(index_type: str, dim: int) -> faiss.Index:
    """An empty inner-product FAISS index from a factory string; IndexBuildError when FAISS rejects it."""
    import faiss

    try:
        return faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise IndexBuildError(
            f"invalid index_type {index_type!r} for dimension {dim}: {reason}. "
            "Examples: 'Flat', 'IVF1024,Flat', 'IVF1024,PQ48', 'HNSW32'."
        ) from None


def set_search_params(index: faiss.Index, nprobe: int, ef_search: int) -> None:
    """Apply the query-time knobs a CPU index has: nprobe for IVF, efSearch for HNSW; others have none."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe
    hnsw = faiss.downcast_index(index)
    if isinstance(hnsw, faiss.IndexHNSW):
        hnsw.hnsw.efSearch = ef_search


def to_gpus(index: faiss.Index, fp16: bool = False, shard: bool = False) -> faiss.Index:
    """Clone ``index`` to all GPUs and probe it with one search; the CPU index (with a warning) if that fails.

    With no GPU (or faiss-cpu) the index is returned unchanged and nothing is logged.
    """
    import faiss

    if faiss.get_num_gpus() == 0:
        return index
    try:
        options = faiss.GpuMultipleClonerOptions()
        options.useFloat16 = fp16
        options.shard = shard
        gpu_index = faiss.index_cpu_to_all_gpus(index, co=options)
        probe = np.zeros((1, index.d), dtype=np.float32)
        probe[0, 0] = 1.0
        gpu_index.search(probe, 1)
    except (RuntimeError, AttributeError, MemoryError) as exc:  # CUDA errors, missing GPU ops, out of memory
        logger.warning("FAISS GPU placement failed (%s); searching on CPU instead", str(exc).strip()[:300])
        return index
    logger.info(
        "FAISS index on %d GPU(s) (%s, fp16=%s)",
        faiss.get_num_gpus(),
        "sharded" if shard else "replicated",
        fp16,
    )
    return gpu_index


def faiss_write(index: faiss.Index, path: Path) -> None:
    """Write a (CPU or GPU) index to ``path``."""
    import faiss

    faiss.write_index(faiss.index_gpu_to_cpu(index) if _on_gpu(index) else index, str(path))


def _embed_into(
    cfg: IndexConfig,
    embedder: Embedder,
    index: faiss.Index,
    passages: Iterator[dict[str, str]],
    writer: pq.ParquetWriter,
    progress: bool,
) -> faiss.Index:
    """Stream passages: embed a chunk, append its rows to Parquet and its vectors to the index (same order).

    Untrained indexes (IVF, PQ) buffer the first ``train_vectors`` vectors, train on them, then add.
    Returns the index (possibly moved to a GPU after training).
    """
    from tqdm.auto import tqdm

    pending: list[np.ndarray] = []
    if index.is_trained and cfg.use_gpu:
        index = _to_one_gpu(index, cfg.gpu_fp16)
    with tqdm(desc=f"embedding ({embedder.spec})", unit="passage", disable=not progress) as bar:
        for rows in _batched(passages, cfg.encode_chunk):
            vectors = embedder.encode_passages([join_contents(r["title"], r["text"]) for r in rows])
            writer.write_table(pa.Table.from_pylist(rows, PASSAGES), row_group_size=ROW_GROUP_ROWS)
            if index.is_trained:
                index.add(vectors)
            else:
                pending.append(vectors)
                if sum(len(v) for v in pending) >= cfg.train_vectors:
                    index = _train_and_add(cfg, index, pending)
                    pending = []
            bar.update(len(rows))
    if pending:
        index = _train_and_add(cfg, index, pending)
    return index


def _train_and_add(cfg: IndexConfig, index: faiss.Index, pending: list[np.ndarray]) -> faiss.Index:
    vectors = np.concatenate(pending)
    try:
        index.train(vectors[: cfg.train_vectors])
    except RuntimeError as exc:
        raise IndexBuildError(
            f"cannot train {cfg.index_type!r} on {len(vectors)} vectors: {str(exc).strip().splitlines()[-1]}. "
            "A smaller corpus needs fewer IVF lists (e.g. IVF{√N},Flat) or a 'Flat' index."
        ) from None
    if cfg.use_gpu:
        index = _to_one_gpu(index, cfg.gpu_fp16)
    index.add(vectors)
    return index


def _to_one_gpu(index: faiss.Index, fp16: bool) -> faiss.Index:
    """For building: adds on one GPU keep ids in insertion order (sharding would interleave them)."""
    import faiss

    if faiss.get_num_gpus() == 0:
        return index
    try:
        options = faiss.GpuClonerOptions()
        options.useFloat16 = fp16
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index, options)
    except (RuntimeError, AttributeError, MemoryError) as exc:
        logger.warning("FAISS GPU placement failed (%s); building on CPU instead", str(exc).strip()[:300])
        return index


def _on_gpu(index: faiss.Index) -> bool:
    return "Gpu" in type(index).__name__ or type(index).__name__ in ("IndexReplicas", "IndexShards")


@contextmanager
def _staged(out_dir: Path) -> Iterator[dict[str, Path]]:
    """Temporary paths for the three files in ``out_dir``, renamed into place (metadata last) when the block
    succeeds; on any error none of them is written."""
    with ExitStack() as files:
        # Entered first, renamed last: the metadata says the other two are complete.
        yield {name: files.enter_context(atomic_file(out_dir / name)) for name in (META_FILE, INDEX_FILE, PASSAGES_FILE)}


def _index_meta(
    embedder: Embedder,
    index_type: str,
    index: faiss.Index,
    fingerprint: str,
    corpus: CorpusConfig,
    stats: CorpusStats,
    started: float,
) -> dict:
    build_seconds = round(time.perf_counter() - started, 3)
    return {
        "format_version": META_VERSION,
        **embedder.meta(),
        "index_type": index_type,
        "metric": "inner_product",
        "count": int(index.ntotal),
        "corpus_fingerprint": fingerprint,
        "corpus": corpus.model_dump(),
        "documents": stats.documents,
        "empty_documents": stats.empty_documents,
        "bad_lines": stats.bad_lines,
        "bad_line_examples": stats.bad_line_examples,
        "device": embedder.device,
        "build_seconds": build_seconds,
        "passages_per_second": round(index.ntotal / max(build_seconds, 1e-9), 2),
    }


def _batched(rows: Iterator[dict[str, str]], size: int) -> Iterator[list[dict[str, str]]]:
    batch: list[dict[str, str]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
