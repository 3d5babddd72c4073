"""Fixtures for the retrieval tests: a small JSONL corpus and one MiniLM index shared by a module's tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from retrieval_fixtures import article_records, write_jsonl


@pytest.fixture
def articles_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "articles.jsonl", article_records())


@pytest.fixture(scope="module")
def built_index(tmp_path_factory) -> Path:
    """A Flat MiniLM index over ARTICLES (built once per test module)."""
    from retrieval.corpus import CorpusConfig
    from retrieval.index import IndexConfig, build_index

    root = tmp_path_factory.mktemp("index")
    corpus = write_jsonl(root / "articles.jsonl", article_records())
    out = root / "flat"
    build_index(IndexConfig(corpus=CorpusConfig(source=str(corpus)), device="cpu"), out, progress=False)
    return out
