"""Teacher CoT solutions: the source of first-thought prefixes (FTP) and of the CoT-distillation data.

The teacher answers each training question with a plain chain-of-thought prompt; the first step
(first paragraph) of its solution becomes that question's FTP prefix, and the whole solution, when
correct, is a training example for the CoT-distilled baseline student. The code of the ``prefixes`` stage
(task: ``tasks/prefixes.py``); the grader is passed in, as to the rollout runner, so the runtime imports no
evaluation code.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from agent_runtime.cot import first_step, run_cot
from agent_runtime.engine import AgentTask
from agent_runtime.rollout import Grader
from questions.datasets import Question


class PrefixConfig(BaseModel):
    """The teacher's CoT pass over the training questions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(512, ge=1, description="token limit of one CoT solution")
    temperature: float = Field(0.0, ge=0.0, description="sampling temperature (0 = greedy)")
    seed: int = Field(0, description="base seed of the per-question seeds")
    batch_size: int = Field(16, ge=1, description="questions per backend call (progress is reported per batch)")
    artifact: str | None = Field(
        None, description="use this existing prefixes artifact (e.g. imported) instead of running the teacher"
    )


def solve_with_cot(questions: list[Question], kind: str, generator, cfg: PrefixConfig, grade: Grader,
                   extract_answer: Callable[[str], str | None],
                   on_progress: Callable[[int], None] | None = None) -> list[dict]:
    """One ``cot_solutions`` row per question: the solution, its answer (``extract_answer``) graded by
    ``grade``, and its first step."""
    tasks = [AgentTask(q.id, q.question) for q in questions]
    results = run_cot(tasks, generator, cfg.max_new_tokens, cfg.temperature, cfg.seed, batch_size=cfg.batch_size,
                      on_progress=None if on_progress is None else lambda finished, _total: on_progress(finished))
    rows = []
    for question, result in zip(questions, results):
        answer = extract_answer(result.text)
        verdict = grade(answer, question.gold, kind)
        rows.append({
            "dataset": question.dataset, "question_id": question.id, "question": question.question,
            "gold": question.answer, "text": result.text, "answer": answer, "correct": verdict.correct,
            "prefix": first_step(result.text), "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens, "latency_s": result.latency_s,
        })
    return rows
