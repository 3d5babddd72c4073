"""Chain-of-thought solutions, and the first step of one for first-thought prefixing (FTP).

FTP (Kang et al. 2025): the teacher first solves the question in plain CoT; the first step of that
solution is forced as the beginning of the agent's first thought, which steers the agent toward a
sound plan. ``run_cot`` produces the solutions in batched calls, ``first_step`` cuts the step:

    results = run_cot(tasks, generator)
    tasks = [replace(t, prefix=first_step(r.text) or None) for t, r in zip(tasks, results)]
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from agent_runtime.engine import AgentTask, stable_seed
from agent_runtime.generation import GenerationError, Generator, Request, Sampling
from agent_runtime.prompts import COT_SYSTEM_PROMPT

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass
class CotResult:
    """One CoT solution (its answer is graded by ``evaluation.grading``, which extracts it)."""

    question_id: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float


def run_cot(
    questions: list[AgentTask],
    generator: Generator,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[CotResult]:
    """Solve every question with CoT; one result per question, in order. The questions go to the backend
    ``batch_size`` at a time (all at once when None), and ``on_progress(finished, total)`` is called after
    each call."""
    size = batch_size or max(len(questions), 1)
    results = []
    for start in range(0, len(questions), size):
        results += _run_cot_batch(questions[start:start + size], generator, max_new_tokens, temperature, seed)
        if on_progress is not None:
            on_progress(len(results), len(questions))
    return results


def _run_cot_batch(questions: list[AgentTask], generator: Generator, max_new_tokens: int, temperature: float,
                   seed: int) -> list[CotResult]:
    """One batched backend call for ``questions``."""
    requests = [
        Request(
            messages=[{"role": "system", "content": COT_SYSTEM_PROMPT}, {"role": "user", "content": q.question}],
            seed=stable_seed(seed, q.question_id, q.sample_index, "cot"),
            label=f"question {q.question_id} sample {q.sample_index} (CoT)",
        )
        for q in questions
    ]
    sampling = Sampling(n=1, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    generations = generator.generate(requests, sampling) if requests else []
    if len(generations) != len(requests):
        raise GenerationError(f"backend {generator.name!r} returned {len(generations)} of {len(requests)} results")
    results = []
    for question, generation in zip(questions, generations):
        completion = generation.completions[0]
        results.append(
            CotResult(
                question_id=question.question_id,
                text=completion.text,
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
                latency_s=completion.latency_s,
            )
        )
    return results


def first_step(cot_text: str) -> str:
    """The first step of a CoT solution: its first paragraph with content ("" if there is none).

    Paragraphs are separated by blank lines; a text without blank lines is split into lines. A bare
    heading ("Solution:", "**Step 1:**") is not a step, so it is skipped.
    """
    text = cot_text.strip()
    parts = _PARAGRAPH_BREAK.split(text)
    if len(parts) == 1:
        parts = text.splitlines()
    for part in parts:
        if part.strip() and not _is_heading(part):
            return part.strip()
    return ""


def _is_heading(paragraph: str) -> bool:
    words = paragraph.strip().strip("#*_ ").rstrip("*_ ")
    return "\n" not in words and (not words or (words.endswith(":") and len(words.split()) <= 4))
