"""Corpus formats, chunking, fingerprints and bad input (no model needed)."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from retrieval_fixtures import ARTICLES, article_records, write_jsonl

from retrieval.corpus import (
    CorpusConfig,
    CorpusError,
    CorpusStats,
    chunk_text,
    corpus_fingerprint,
    iter_passages,
    join_contents,
    source_files,
    split_contents,
)


def test_plain_jsonl_passages_keep_ids_titles_and_text(articles_jsonl):
    stats = CorpusStats()
    rows = list(iter_passages(CorpusConfig(source=str(articles_jsonl)), stats))
    assert [r["id"] for r in rows] == [f"doc{i}" for i in range(len(ARTICLES))]
    assert rows[1] == {"id": "doc1", "title": "Mount Everest", "text": ARTICLES["Mount Everest"]}
    assert (stats.documents, stats.passages, stats.bad_lines) == (12, 12, 0)


def test_searchr1_format_is_detected_and_split_into_title_and_text(tmp_path):
    path = write_jsonl(
        tmp_path / "wiki.jsonl",
        [
            {"id": "0", "contents": '"Aaron"\nAaron is a prophet.\nSecond line.'},
            {"id": "1", "contents": '""Heroes" (song)"\nA song by David Bowie.'},
        ],
    )
    assert source_files(CorpusConfig(source=str(path)))[0] == "searchr1"
    rows = list(iter_passages(CorpusConfig(source=str(path))))
    assert rows[0] == {"id": "0", "title": "Aaron", "text": "Aaron is a prophet.\nSecond line."}
    assert rows[1]["title"] == '"Heroes" (song)'
    # The contents string round-trips, so the HTTP service returns what the corpus had.
    assert join_contents(rows[1]["title"], rows[1]["text"]) == '""Heroes" (song)"\nA song by David Bowie.'


def test_gzipped_jsonl_and_parquet_give_the_same_passages(tmp_path, articles_jsonl):
    gz = tmp_path / "articles.jsonl.gz"
    gz.write_bytes(gzip.compress(articles_jsonl.read_bytes()))
    parquet = tmp_path / "articles.parquet"
    pq.write_table(pa.Table.from_pylist(article_records()), parquet)
    expected = list(iter_passages(CorpusConfig(source=str(articles_jsonl))))
    assert list(iter_passages(CorpusConfig(source=str(gz)))) == expected
    assert list(iter_passages(CorpusConfig(source=str(parquet)))) == expected


def test_a_folder_is_read_file_by_file_in_name_order(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    records = article_records()
    write_jsonl(folder / "part-1.jsonl", records[6:])
    write_jsonl(folder / "part-0.jsonl", records[:6])
    ids = [r["id"] for r in iter_passages(CorpusConfig(source=str(folder)))]
    assert ids == [r["id"] for r in records]


def test_long_documents_are_cut_into_balanced_chunks_that_keep_the_title(tmp_path):
    words = [f"w{i}" for i in range(250)]
    path = write_jsonl(tmp_path / "long.jsonl", [{"id": "a", "title": "Long", "text": " ".join(words)}])
    rows = list(iter_passages(CorpusConfig(source=str(path), chunk_words=100)))
    assert [r["id"] for r in rows] == ["a#0", "a#1", "a#2"]
    assert [len(r["text"].split()) for r in rows] == [84, 83, 83]
    assert all(r["title"] == "Long" for r in rows)
    assert " ".join(r["text"] for r in rows).split() == words  # nothing lost, order kept


def test_chunk_text_keeps_short_text_verbatim_and_drops_empty():
    assert chunk_text("  a  b\nc ", 3) == ["a  b\nc"]
    assert chunk_text(" \n ", 3) == []
    assert chunk_text("a b c d e", 2) == ["a b", "c d", "e"]


def test_split_contents_without_newline_is_all_text():
    assert split_contents("just text") == ("", "just text")


def test_limit_reads_only_the_first_documents(articles_jsonl):
    rows = list(iter_passages(CorpusConfig(source=str(articles_jsonl), limit=3)))
    assert [r["id"] for r in rows] == ["doc0", "doc1", "doc2"]


def test_vital_articles_default_yields_titled_passages_with_title_ids():
    stats = CorpusStats()
    rows = list(iter_passages(CorpusConfig(limit=50), stats))
    assert stats.documents == 50 and len(rows) >= 50
    first = rows[0]
    assert first["title"] and first["text"]
    assert first["id"] == first["title"] or first["id"].startswith(first["title"] + "#")
    assert all(len(r["text"].split()) <= 100 for r in rows)


def test_fingerprint_follows_content_and_config(tmp_path, articles_jsonl):
    cfg = CorpusConfig(source=str(articles_jsonl))
    first = corpus_fingerprint(cfg)
    assert first == corpus_fingerprint(cfg)
    assert corpus_fingerprint(CorpusConfig(source=str(articles_jsonl), chunk_words=50)) != first
    records = article_records()
    records[0]["text"] += " One more sentence."
    write_jsonl(articles_jsonl, records)
    assert corpus_fingerprint(cfg) != first


def test_missing_corpus_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(CorpusError, match=f"corpus file not found: {missing}"):
        list(iter_passages(CorpusConfig(source=str(missing))))
    with pytest.raises(CorpusError, match="not found"):
        corpus_fingerprint(CorpusConfig(source=str(missing)))


def test_empty_corpus_is_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(CorpusError, match="holds no passages"):
        list(iter_passages(CorpusConfig(source=str(empty))))


def test_malformed_json_line_names_file_and_line(tmp_path):
    records = article_records()[:3]
    path = write_jsonl(
        tmp_path / "bad.jsonl", [records[0], records[1], '{"id": "x", "title": "broken', records[2]]
    )
    with pytest.raises(CorpusError, match=rf"{path}:3: malformed JSON .*skip_bad_lines"):
        list(iter_passages(CorpusConfig(source=str(path))))


def test_skip_bad_lines_skips_and_counts(tmp_path):
    records = article_records()[:3]
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [records[0], "not json", records[1], {"id": "y", "title": "no text"}, [1, 2], records[2]],
    )
    stats = CorpusStats()
    rows = list(iter_passages(CorpusConfig(source=str(path), skip_bad_lines=True), stats))
    assert [r["id"] for r in rows] == ["doc0", "doc1", "doc2"]
    assert stats.bad_lines == 3
    assert stats.bad_line_examples[0].startswith(f"{path}:2: malformed JSON")
    assert f"{path}:4: missing field(s) ['text']" in stats.bad_line_examples[1]


def test_wrong_field_type_is_reported_with_its_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "title": "T", "text": 5}])
    with pytest.raises(CorpusError, match=rf"{path}:1: field 'text' must be a string"):
        list(iter_passages(CorpusConfig(source=str(path))))


def test_duplicate_ids_are_refused_with_their_location(tmp_path):
    records = article_records()[:3]
    records[2]["id"] = "doc0"
    path = write_jsonl(tmp_path / "dup.jsonl", records)
    with pytest.raises(CorpusError, match=rf"{path}:3: duplicate id 'doc0'"):
        list(iter_passages(CorpusConfig(source=str(path))))


def test_parquet_without_the_needed_columns_is_refused(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), path)
    with pytest.raises(CorpusError, match="needs columns id,title,text"):
        list(iter_passages(CorpusConfig(source=str(path))))


def test_unknown_suffix_needs_an_explicit_format(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(json.dumps(article_records()[0]) + "\n")
    with pytest.raises(CorpusError, match="cannot infer the corpus format"):
        list(iter_passages(CorpusConfig(source=str(path))))
    rows = list(iter_passages(CorpusConfig(source=str(path), format="jsonl")))
    assert rows[0]["id"] == "doc0"


def test_passages_stream_before_the_rest_of_the_file_is_read(tmp_path):
    # A bad line further down does not stop the first passages: nothing reads the file ahead.
    records = article_records()[:2]
    path = write_jsonl(tmp_path / "later-bad.jsonl", [records[0], records[1], "{broken"])
    stream = iter_passages(CorpusConfig(source=str(path)))
    assert next(stream)["id"] == "doc0"
    assert next(stream)["id"] == "doc1"
    with pytest.raises(CorpusError, match=":3: malformed JSON"):
        next(stream)
