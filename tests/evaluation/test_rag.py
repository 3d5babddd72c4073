"""Retrieval-augmented CoT (the paper's Distill + RAG row): the question's passages go into the prompt."""

import pytest
from pydantic import ValidationError

from agent_runtime.backends.scripted import ScriptedGenerator
from evaluation.evaluate import EvalConfig, MethodConfig, cot_rows
from questions.datasets import Question


def test_rag_puts_the_passages_of_the_question_in_the_prompt_and_grades_the_answer():
    searched = []

    def search(query: str) -> str:
        searched.append(query)
        return '"Mozart" Wolfgang Amadeus Mozart was born in Salzburg.'

    generator = ScriptedGenerator(["Mozart was born in Salzburg.\n\nThe final answer is \\boxed{Salzburg}."])
    question = Question(id="q1", dataset="facts", question="Where was Mozart born?", answer="Salzburg", metadata={})
    [row] = cot_rows([question], "qa", generator, EvalConfig(), {"method": "cot+rag"}, search)
    [(requests, _)] = generator.calls
    prompt = requests[0].messages[-1]["content"]
    assert searched == ["Where was Mozart born?"]
    assert prompt == ('Passages that may help:\n"Mozart" Wolfgang Amadeus Mozart was born in Salzburg.\n\n'
                      "Question: Where was Mozart born?")
    assert row["prediction"] == "Salzburg" and row["correct"] and row["question"] == "Where was Mozart born?"


def test_without_search_the_prompt_is_the_question():
    generator = ScriptedGenerator(["The final answer is \\boxed{4}."])
    [row] = cot_rows([Question(id="q", dataset="arith", question="2+2?", answer="4", metadata={})], "math", generator,
                     EvalConfig(), {})
    assert generator.calls[0][0][0].messages[-1]["content"] == "2+2?" and row["correct"]


def test_rag_is_only_for_cot():
    with pytest.raises(ValidationError, match="rag is for mode 'cot'"):
        MethodConfig(name="agent+rag", mode="agent", rag=True)


def test_cot_reports_progress_after_every_batch_and_keeps_the_order():
    questions = [Question(id=f"q{i}", dataset="arith", question=f"{i}+0?", answer=str(i), metadata={})
                 for i in range(20)]
    generator = ScriptedGenerator([f"The final answer is \\boxed{{{i}}}." for i in range(20)])
    progress = []
    rows = cot_rows(questions, "math", generator, EvalConfig(), {}, on_progress=lambda d, t: progress.append((d, t)))
    assert progress == [(16, 20), (20, 20)]
    assert [len(requests) for requests, _ in generator.calls] == [16, 4]
    assert [row["question_id"] for row in rows] == [f"q{i}" for i in range(20)] and all(r["correct"] for r in rows)
