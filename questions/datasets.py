"""Load question sets into :class:`Question` records and fingerprint them for artifact ids.

Sources:
- ``builtin:arith`` / ``builtin:facts``: the project's own sets (see ``questions/builtin.py``).
- ``*.json``: the layout released with the paper's code,
  ``{"metadata": {...}, "examples": [{"id", "question", "answer", ...}, ...]}``.
- ``*.jsonl``: one example object per line.
- ``*.parquet``: one example per row.

Field names can be remapped (``fields={"question": "problem"}``); every field other than id, question and
answer is kept in ``Question.metadata`` (``level``, ``type``, ``solution``, ...). A gold answer that is a
list is a list of aliases: the first is ``Question.answer``, all are in ``metadata["answer_aliases"]``.

    >>> qs = load_dataset(DatasetConfig(name="gsm-hard", source="data/gsm_hard_500.json", limit=10))
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.errors import UserError
from questions import builtin

BUILTIN_KINDS: dict[str, Literal["math", "qa"]] = {"builtin:arith": "math", "builtin:facts": "qa"}
CANONICAL_FIELDS = ("id", "question", "answer")
ALIASES_KEY = "answer_aliases"


class DatasetError(UserError, ValueError):
    """A dataset source that cannot be read; the message names the file and the example."""


class DatasetConfig(BaseModel):
    """Which questions to load."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        description="Label used in tables and artifact names, e.g. 'gsm-hard', 'arith', 'facts'."
    )
    source: str = Field(
        description="'builtin:arith', 'builtin:facts', or a path to a .json / .jsonl / .parquet file."
    )
    split: str = Field(
        "test", description="Split of a builtin set: 'train' or 'test' (files are one split each)."
    )
    kind: Literal["math", "qa"] = Field("math", description="Grader family: 'math' or 'qa' (factual).")
    limit: int | None = Field(None, ge=1, description="Keep only the first N questions (None keeps all).")
    num_questions: int = Field(
        64, ge=1, description="Number of generated questions per split for builtin:arith."
    )
    seed: int = Field(0, description="Seed of the builtin:arith generator.")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map canonical field -> field in the file, e.g. {'question': 'problem', 'answer': 'solution'}.",
    )

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, fields: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(fields) - set(CANONICAL_FIELDS))
        if unknown:
            raise ValueError(f"fields can remap only {list(CANONICAL_FIELDS)}, not {unknown}")
        return fields

    @model_validator(mode="after")
    def _builtin_consistent(self) -> DatasetConfig:
        if not self.source.startswith("builtin:"):
            return self
        if self.source not in BUILTIN_KINDS:
            raise ValueError(f"unknown builtin dataset {self.source!r}; choose from {sorted(BUILTIN_KINDS)}")
        if self.kind != BUILTIN_KINDS[self.source]:
            raise ValueError(
                f"{self.source} is graded as kind={BUILTIN_KINDS[self.source]!r}, not {self.kind!r}"
            )
        if self.split not in ("train", "test"):
            raise ValueError(f"{self.source} has splits 'train' and 'test', not {self.split!r}")
        if self.fields:
            raise ValueError("fields (a field mapping) applies to dataset files, not to builtin sets")
        return self


@dataclass(frozen=True)
class Question:
    """One question. ``answer`` is None when the source has no gold (such questions are not scored)."""

    id: str
    question: str
    answer: str | None
    dataset: str
    metadata: dict[str, Any]

    @property
    def gold(self) -> str | list[str] | None:
        """What to pass to ``grading.grade``: the alias list when the source had one, else ``answer``."""
        aliases = self.metadata.get(ALIASES_KEY, None)
        return list(aliases) if aliases else self.answer


def load_dataset(cfg: DatasetConfig) -> list[Question]:
    """The questions of ``cfg`` in source order (first ``cfg.limit`` if set); ids are unique strings."""
    if cfg.source == "builtin:arith":
        questions = _arith_questions(cfg)
    elif cfg.source == "builtin:facts":
        questions = _facts_questions(cfg)
    else:
        path = Path(cfg.source).expanduser()
        records, positions = read_records(path)
        questions = _to_questions(records, positions, path, cfg)
    return questions[: cfg.limit] if cfg.limit is not None else questions


def with_limit(cfg: DatasetConfig, limit: int | None) -> DatasetConfig:
    """``cfg`` restricted to its first ``limit`` questions (the tighter of both limits)."""
    if limit is None:
        return cfg
    return cfg.model_copy(update={"limit": min(limit, cfg.limit) if cfg.limit else limit})


def dataset_fingerprint(cfg: DatasetConfig) -> str:
    """sha256 hex digest of the config plus the file's bytes (or, for builtin sets, the generated content)."""
    digest = hashlib.sha256()
    digest.update(cfg.model_dump_json().encode())
    if cfg.source.startswith("builtin:"):
        content = [asdict(q) for q in load_dataset(cfg)]
        digest.update(json.dumps(content, sort_keys=True, ensure_ascii=False).encode())
        return digest.hexdigest()
    path = Path(cfg.source).expanduser()
    try:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read dataset file ({e.strerror})") from e
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- builtins


def _arith_questions(cfg: DatasetConfig) -> list[Question]:
    problems = builtin.generate_arith(cfg.seed, cfg.split, cfg.num_questions)  # type: ignore[arg-type]
    return [
        Question(
            id=f"arith-{cfg.split}-{i}",
            question=p.question,
            answer=p.answer,
            dataset=cfg.name,
            metadata={
                "template": p.template,
                "expression": p.expression,
                "operations": p.operations,
                "split": cfg.split,
                "seed": cfg.seed,
            },
        )
        for i, p in enumerate(problems)
    ]


def _facts_questions(cfg: DatasetConfig) -> list[Question]:
    return [
        Question(
            id=f"facts-{i}",
            question=f.question,
            answer=f.answer,
            dataset=cfg.name,
            metadata={
                "source_title": f.source_title,
                "bridge_title": f.bridge_title,
                "hops": f.hops,
                "split": cfg.split,
            },
        )
        for i, f in builtin.facts_split(cfg.split)  # type: ignore[arg-type]
    ]


# ---------------------------------------------------------------------------------------------- files


def read_records(path: Path) -> tuple[list[Any], list[int]]:
    """The raw example records of a dataset file (not yet validated) and where each one is in the file:
    its line (from 1) in JSON Lines, its index (from 0) in the paper layout's "examples" list or among
    the Parquet rows."""
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file not found")
    suffix = path.suffix.lower()
    if suffix == ".json":
        records = _read_paper_json(path)
        return records, list(range(len(records)))
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".parquet":
        records = _read_parquet(path)
        return records, list(range(len(records)))
    raise DatasetError(
        f"{path}: unsupported dataset format {suffix!r}; use .json (paper layout), .jsonl or .parquet"
    )


def _read_paper_json(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_bytes())
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a JSON file (not UTF-8 text: {e.reason})") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise DatasetError(
            f'{path}: expected the paper layout {{"metadata": ..., "examples": [...]}} with a list under '
            '"examples"; one example per line belongs in a .jsonl file'
        )
    return data["examples"]


def _read_jsonl(path: Path) -> tuple[list[Any], list[int]]:
    records, linenos = [], []  # blank lines are skipped, so a record's index is not its line
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a JSON Lines file (not UTF-8 text: {e.reason})") from e
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
            linenos.append(lineno)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
    return records, linenos


def _read_parquet(path: Path) -> list[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: not a readable Parquet file ({e})") from e


def _to_questions(records: list[Any], positions: list[int], path: Path, cfg: DatasetConfig) -> list[Question]:
    if not records:
        raise DatasetError(f"{path}: the dataset holds no examples")
    names = {field: cfg.fields.get(field, field) for field in CANONICAL_FIELDS}
    if not any(isinstance(r, dict) and names["answer"] in r for r in records):
        raise DatasetError(
            f"{path}: no example has an answer field {names['answer']!r}; map it with "
            f"fields={{'answer': '<name in the file>'}}"
        )
    questions, first_index = [], {}
    for index, record in enumerate(records):
        q = _to_question(record, index, path, names, cfg.name)
        if q.id in first_index:
            first, second = positions[first_index[q.id]], positions[index]
            raise DatasetError(f"{path}: {_two_places(path, first, second)} share the id {q.id!r}")
        first_index[q.id] = index
        questions.append(q)
    return questions


def _two_places(path: Path, first: int, second: int) -> str:
    """Two records' places (``read_records``' positions) in the terms the user finds them by in the file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return f"lines {first} and {second}"
    if suffix == ".json":
        return f'entries {first} and {second} (counting from 0) of "examples"'
    return f"rows {first} and {second} (counting from 0)"


def _to_question(record: Any, index: int, path: Path, names: dict[str, str], dataset: str) -> Question:
    where = f"{path}: example {index}"
    if not isinstance(record, dict):
        raise DatasetError(
            f"{where}: expected an object with id/question/answer, got {type(record).__name__}"
        )
    raw_id = record.get(names["id"], index)
    if isinstance(raw_id, (dict, list)) or raw_id is None:
        raise DatasetError(f"{where}: id must be a string or a number, got {raw_id!r}")
    qid = str(raw_id)
    where = f"{where} (id {qid!r})"
    if names["question"] not in record:
        raise DatasetError(
            f"{where}: no {names['question']!r} field (fields present: {sorted(record)}); "
            "map the question field with fields={'question': '<name in the file>'}"
        )
    text = record[names["question"]]
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(f"{where}: the question must be a non-empty string, got {text!r}")
    answer, aliases = _answer_text(record.get(names["answer"], None), where)
    metadata = {k: v for k, v in record.items() if k not in names.values()}
    if aliases is not None:
        metadata[ALIASES_KEY] = aliases
    return Question(id=qid, question=text, answer=answer, dataset=dataset, metadata=metadata)


def _answer_text(value: Any, where: str) -> tuple[str | None, list[str] | None]:
    """(answer, aliases): numbers become their shortest round-trip text (GSM-Hard's 5.0 stays "5.0")."""
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, (str, int, float, list)):
        raise DatasetError(
            f"{where}: the answer must be a string, a number or a list of aliases, got {value!r}"
        )
    if isinstance(value, list):
        aliases = [_answer_text(v, where)[0] for v in value]
        aliases = [a for a in aliases if a is not None and a.strip()]
        return (aliases[0], aliases) if aliases else (None, None)
    text = value if isinstance(value, str) else repr(value)
    return (text, None) if text.strip() else (None, None)
