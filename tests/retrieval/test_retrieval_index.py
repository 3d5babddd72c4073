"""Index build/load with the embedded MiniLM: files written, search quality, refusals, atomicity."""

from __future__ import annotations

import json
import logging

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from retrieval_fixtures import ARTICLES, article_records, write_jsonl

from models.resolve import ModelNotAvailable
from retrieval.corpus import CorpusConfig, CorpusError, join_contents
from retrieval.embed import E5_PREFIXES, Embedder, prefixes_for
from retrieval.index import (
    IndexArtifactError,
    IndexBuildError,
    IndexConfig,
    build_index,
    import_index,
    load_index,
    read_index_meta,
    set_search_params,
    to_gpus,
)
from retrieval.retriever import format_results, web_search

TITLES = list(ARTICLES)


def assert_nothing_left(out_dir):
    """No file at all (temporaries included) in the output directory, if it was created."""
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_build_writes_index_passages_and_meta_in_faiss_order(built_index):
    assert sorted(p.name for p in built_index.iterdir()) == [
        "faiss.index",
        "index_meta.json",
        "passages.parquet",
    ]
    meta = read_index_meta(built_index)
    assert meta["embedder"] == "minilm-l6-v2"
    assert (meta["dim"], meta["count"], meta["index_type"], meta["bad_lines"]) == (384, 12, "Flat", 0)
    assert (meta["query_prefix"], meta["passage_prefix"]) == ("", "")
    assert len(meta["corpus_fingerprint"]) == 64 and meta["build_seconds"] > 0
    table = pq.read_table(built_index / "passages.parquet")
    assert table.column_names == ["id", "title", "text"]
    assert table.column("id").to_pylist() == [f"doc{i}" for i in range(12)]
    # Row i ↔ vector i: the stored vector of row 5 is the embedding of row 5's contents.
    index = faiss.read_index(str(built_index / "faiss.index"))
    embedder = Embedder("minilm-l6-v2", device="cpu")
    row5 = embedder.encode_passages([join_contents(TITLES[5], ARTICLES[TITLES[5]])])[0]
    # Equal up to the embedder's precision: under bf16 autocast (CPUs with native bf16) a passage's vector
    # depends slightly on the batch it was encoded in, so the check is cosine and nearest neighbour.
    stored = index.reconstruct(5)
    assert float(stored @ row5 / (np.linalg.norm(stored) * np.linalg.norm(row5))) > 0.999
    assert index.search(row5[None, :].astype(np.float32), 1)[1][0][0] == 5


def test_a_title_query_retrieves_that_article_first(built_index):
    retriever = load_index(built_index, "minilm-l6-v2", device="cpu")
    results = retriever.search(TITLES, k=3)
    assert [hits[0].title for hits in results] == TITLES
    assert all(len(hits) == 3 for hits in results)
    assert all(hits[0].score >= hits[1].score >= hits[2].score for hits in results)
    assert 0.3 < results[0][0].score <= 1.0 + 1e-5  # cosine of unit vectors


def test_web_search_renders_the_papers_format(built_index):
    retriever = load_index(built_index, "minilm-l6-v2", device="cpu")
    text = web_search(retriever, "Penicillin")
    top = retriever.search(["Penicillin"], k=3)[0]
    assert text.startswith("Retrieved documents:\n\n===== Document 1, similarity: ")
    assert (
        f'===== Document 1, similarity: {top[0].score:.2f} =====\n"Penicillin"\n{ARTICLES["Penicillin"]}'
        in text
    )
    assert text.count("===== Document ") == 3 and "===== Document 3, similarity: " in text
    assert format_results([]) == "Retrieved documents:\n\nNo documents found."


def test_k_larger_than_the_index_returns_every_passage(built_index):
    retriever = load_index(built_index, "minilm-l6-v2", device="cpu")
    assert len(retriever.search(["jazz"], k=50)[0]) == 12
    assert retriever.search([], k=3) == []
    with pytest.raises(ValueError, match="k must be"):
        retriever.search(["jazz"], k=0)


def test_loading_with_another_embedder_is_refused(built_index, tmp_path):
    with pytest.raises(
        IndexArtifactError, match=r"built with embedder 'minilm-l6-v2', but the configured .*'e5-base'"
    ):
        load_index(built_index, "e5-base", device="cpu")
    # Same name, but the meta says another dimension/prefixes than the model gives now.
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for name in ("faiss.index", "passages.parquet"):
        (tampered / name).write_bytes((built_index / name).read_bytes())
    meta = json.loads((built_index / "index_meta.json").read_text())
    (tampered / "index_meta.json").write_text(json.dumps({**meta, "query_prefix": "query: "}))
    with pytest.raises(IndexArtifactError, match="was built with"):
        load_index(tampered, "minilm-l6-v2", device="cpu")


def test_an_incomplete_index_directory_is_refused(tmp_path):
    with pytest.raises(IndexArtifactError, match="index_meta.json is missing"):
        load_index(tmp_path, "minilm-l6-v2")


def test_embedder_not_available_offline_leaves_nothing_behind(tmp_path, articles_jsonl):
    out = tmp_path / "out"
    cfg = IndexConfig(corpus=CorpusConfig(source=str(articles_jsonl)), embedder="no-such-org/no-such-model")
    with pytest.raises(ModelNotAvailable, match="not in the local Hugging Face cache"):
        build_index(cfg, out, progress=False)
    assert_nothing_left(out)


def test_bad_line_after_some_chunks_leaves_nothing_behind(tmp_path):
    records = article_records()
    path = write_jsonl(tmp_path / "bad.jsonl", [*records[:6], "{oops", *records[6:]])
    out = tmp_path / "out"
    cfg = IndexConfig(corpus=CorpusConfig(source=str(path)), device="cpu", encode_chunk=2)
    with pytest.raises(CorpusError, match=rf"{path}:7: malformed JSON"):
        build_index(cfg, out, progress=False)
    assert_nothing_left(out)
    # With skip_bad_lines the same file builds, and the meta counts the skipped line.
    skip = cfg.model_copy(update={"corpus": CorpusConfig(source=str(path), skip_bad_lines=True)})
    meta = build_index(skip, out, progress=False)
    assert (meta["count"], meta["bad_lines"]) == (12, 1)


def test_missing_corpus_fails_before_loading_a_model(tmp_path):
    out = tmp_path / "out"
    cfg = IndexConfig(corpus=CorpusConfig(source=str(tmp_path / "absent.jsonl")), embedder="no-such-org/x")
    with pytest.raises(CorpusError, match="corpus file not found"):
        build_index(cfg, out, progress=False)
    assert_nothing_left(out)


def test_invalid_index_type_is_a_clear_error(tmp_path, articles_jsonl):
    cfg = IndexConfig(corpus=CorpusConfig(source=str(articles_jsonl)), index_type="Bogus", device="cpu")
    with pytest.raises(IndexBuildError, match="invalid index_type 'Bogus'.*Examples"):
        build_index(cfg, tmp_path / "out", progress=False)


def test_ivf_with_more_lists_than_vectors_is_a_clear_error(tmp_path, articles_jsonl):
    cfg = IndexConfig(corpus=CorpusConfig(source=str(articles_jsonl)), index_type="IVF64,Flat", device="cpu")
    with pytest.raises(IndexBuildError, match="cannot train 'IVF64,Flat' on 12 vectors"):
        build_index(cfg, tmp_path / "out", progress=False)
    assert_nothing_left(tmp_path / "out")


@pytest.mark.parametrize("index_type", ["IVF2,Flat", "HNSW8"])
def test_ivf_and_hnsw_indexes_build_and_search(tmp_path, articles_jsonl, index_type):
    cfg = IndexConfig(
        corpus=CorpusConfig(source=str(articles_jsonl)),
        index_type=index_type,
        device="cpu",
        encode_chunk=5,
        train_vectors=8,  # trains on the first two chunks, then adds the rest as it streams
    )
    meta = build_index(cfg, tmp_path / "out", progress=False)
    assert (meta["count"], meta["index_type"]) == (12, index_type)
    retriever = load_index(tmp_path / "out", "minilm-l6-v2", device="cpu", nprobe=2, ef_search=16)
    assert [hits[0].title for hits in retriever.search(TITLES, k=1)] == TITLES


def test_search_params_reach_the_index():
    ivf = faiss.index_factory(8, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    hnsw = faiss.index_factory(8, "HNSW8", faiss.METRIC_INNER_PRODUCT)
    set_search_params(ivf, nprobe=3, ef_search=7)
    set_search_params(hnsw, nprobe=3, ef_search=7)
    assert faiss.extract_index_ivf(ivf).nprobe == 3
    assert faiss.downcast_index(hnsw).hnsw.efSearch == 7


def test_gpu_probe_failure_falls_back_to_cpu_with_a_warning(monkeypatch, caplog):
    index = faiss.IndexFlatIP(4)

    class Options:  # stands in for faiss.GpuMultipleClonerOptions, absent from faiss-cpu
        useFloat16 = False
        shard = False

    def broken_clone(cpu_index, co):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2, raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", Options, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", broken_clone, raising=False)
    with caplog.at_level(logging.WARNING, logger="retrieval.index"):
        assert to_gpus(index, fp16=True, shard=True) is index
    assert "GPU placement failed (CUDA error: out of memory); searching on CPU" in caplog.text

    seen = {}

    def clone(cpu_index, co):
        seen.update(fp16=co.useFloat16, shard=co.shard)
        return cpu_index  # a CPU index passes the probe search like a working GPU clone

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", clone, raising=False)
    assert to_gpus(index, fp16=True, shard=False) is index
    assert seen == {"fp16": True, "shard": False}


def test_without_gpus_the_index_stays_as_is():
    index = faiss.IndexFlatIP(4)
    assert faiss.get_num_gpus() == 0
    assert to_gpus(index) is index


def test_prefixes_follow_model_prompts_then_the_e5_rule():
    assert prefixes_for("minilm-l6-v2", {"query": "", "document": ""}) == ("", "")
    assert prefixes_for("intfloat/e5-base-v2", {"query": None, "document": None}) == E5_PREFIXES
    assert prefixes_for("/models/multilingual-e5-large", {}) == E5_PREFIXES
    assert prefixes_for("bge5-small", {}) == ("", "")
    prompts = {"query": "Represent this query: ", "passage": "Represent this doc: "}
    assert prefixes_for("intfloat/e5-base-v2", prompts) == ("Represent this query: ", "Represent this doc: ")


def test_import_adopts_a_prebuilt_index_with_its_corpus(tmp_path, built_index):
    # A Search-R1-style drop-in: a FAISS file plus a {"id","contents"} corpus in the same order.
    table = pq.read_table(built_index / "passages.parquet").to_pylist()
    corpus = write_jsonl(
        tmp_path / "wiki.jsonl",
        [{"id": r["id"], "contents": join_contents(r["title"], r["text"])} for r in table],
    )
    prebuilt = tmp_path / "e5_Flat.index"
    prebuilt.write_bytes((built_index / "faiss.index").read_bytes())
    out = tmp_path / "imported"
    meta = import_index(prebuilt, CorpusConfig(source=str(corpus)), "minilm-l6-v2", out)
    assert (meta["count"], meta["index_type"]) == (12, "imported:IndexFlatIP")
    ours = load_index(built_index, "minilm-l6-v2", device="cpu").search(TITLES, k=3)
    theirs = load_index(out, "minilm-l6-v2", device="cpu").search(TITLES, k=3)
    assert ours == theirs
    # A corpus that does not match the index one to one is refused, and nothing is left.
    short = write_jsonl(tmp_path / "short.jsonl", [{"id": "0", "contents": '"A"\nb'}])
    with pytest.raises(IndexArtifactError, match="holds 12 vectors but the corpus .* gives 1 passages"):
        import_index(prebuilt, CorpusConfig(source=str(short)), "minilm-l6-v2", tmp_path / "bad")
    assert_nothing_left(tmp_path / "bad")


@pytest.mark.slow
def test_vital_articles_title_queries_find_their_article_first(tmp_path):
    # The embedded default corpus, first 150 articles (the full build is measured by bench/retrieval.py).
    cfg = IndexConfig(corpus=CorpusConfig(limit=150), device="cpu")
    meta = build_index(cfg, tmp_path / "vital", progress=False)
    assert meta["documents"] == 150 and meta["count"] >= 150
    titles = (
        pq.read_table(tmp_path / "vital" / "passages.parquet", columns=["title"]).column("title").to_pylist()
    )
    sample = sorted(set(titles))[::10]
    retriever = load_index(tmp_path / "vital", "minilm-l6-v2", device="cpu")
    firsts = [hits[0] for hits in retriever.search(sample, k=1)]
    assert [p.title for p in firsts] == sample
    assert all(p.id == p.title or p.id.startswith(p.title + "#") for p in firsts)


def test_half_precision_keeps_the_vectors():
    # What "auto" resolves to is tested in tests/devices/test_precision.py, with the CPU probe patched.
    texts = [join_contents(title, ARTICLES[title]) for title in TITLES]
    full = Embedder("minilm-l6-v2", device="cpu", precision="float32")
    half = Embedder("minilm-l6-v2", device="cpu", precision="bfloat16")
    assert (full.meta()["precision"], half.meta()["precision"]) == ("float32", "bfloat16")
    a, b = full.encode_passages(texts), half.encode_passages(texts)
    assert b.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cosine = (a * b).sum(axis=1)
    assert cosine.min() > 0.999, cosine
    # The same nearest neighbour for every title query.
    queries = TITLES
    nearest = [(full.encode_queries(queries) @ a.T).argmax(1), (half.encode_queries(queries) @ b.T).argmax(1)]
    assert nearest[0].tolist() == nearest[1].tolist() == list(range(len(TITLES)))
