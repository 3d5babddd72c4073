"""Agent rollouts over question sets: run, grade, turn into ``episodes``/``steps`` rows, in parts.

The teacher-rollout stage and the evaluation stage both run the CodeAct agent over questions; this
module is what they share. Questions are assigned to parts by a pure function of their id
(``part_of``), each part is run as one batched population and written as one Parquet part per
table, so an interrupted run resumes by skipping the parts whose files exist.

The caller passes the grader (``evaluation.grading.grade``): grading is evaluation's, and the agent
runtime does not import it.

    rows = run_questions(questions, kind="math", generator=g, sandbox=s, agent=cfg, grade=grade, ...)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent_runtime.engine import AgentConfig, AgentTask, Episode, run_agent
from questions.datasets import DatasetConfig, Question

# grade(prediction, gold, kind, error=...) -> a verdict with correct, score, method, excluded, pred_norm,
# gold_norm, em and f1: ``evaluation.grading.grade``.
Grader = Callable[..., Any]

# The demo teacher rollouts read the built-in training splits; evaluation reads the test splits.
TRAIN_SETS = (
    DatasetConfig(name="arith", source="builtin:arith", split="train", kind="math", num_questions=32),
    DatasetConfig(name="facts", source="builtin:facts", split="train", kind="qa"),
)


class RolloutConfig(BaseModel):
    """Teacher rollouts: which questions, how the agent runs, how many samples per question."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    datasets: tuple[DatasetConfig, ...] = Field(TRAIN_SETS, description="question sets the teacher solves")
    agent: AgentConfig = Field(AgentConfig(prompt="teacher"), description="agent settings of the teacher")
    samples_per_question: int = Field(1, ge=1, description="episodes per question (rejection sampling when > 1)")
    use_prefixes: bool = Field(False, description="start each first thought with the teacher's CoT first step (FTP)")
    num_parts: int = Field(8, ge=1, description="parts per dataset; each is written atomically and skipped on resume")
    limit: int | None = Field(None, ge=1, description="take only the first N questions of each dataset")
    artifact: str | None = Field(
        None, description="use this existing trajectories artifact (e.g. imported) instead of running the teacher"
    )

    @model_validator(mode="after")
    def _samples_can_differ(self) -> RolloutConfig:
        varied = self.agent.temperature > 0 or self.agent.sag.enabled
        if self.samples_per_question > 1 and not varied:
            raise ValueError("samples_per_question > 1 needs agent.temperature > 0 (or SAG): greedy samples are equal")
        return self


def part_of(question_id: str, num_parts: int) -> int:
    """The part (or shard) of a question: a pure function of its id, stable across processes."""
    digest = hashlib.blake2b(question_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_parts


def split_parts(questions: list[Question], num_parts: int) -> list[list[Question]]:
    parts: list[list[Question]] = [[] for _ in range(num_parts)]
    for question in questions:
        parts[part_of(question.id, num_parts)].append(question)
    return parts


@dataclass
class Rows:
    """The rows a part produced, ready for ``storage.schemas.EPISODES``/``STEPS``."""

    episodes: list[dict]
    steps: list[dict]


def run_questions(
    questions: list[Question],
    kind: str,
    generator,
    sandbox,
    agent: AgentConfig,
    grade: Grader,
    samples: int = 1,
    prefixes: dict[str, str] | None = None,
    labels: dict | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Rows:
    """Run ``samples`` episodes per question as one population, grade them (``grade``), return their rows.

    ``labels`` (model, method, ...) are copied into every episode row. ``prefixes`` maps question id to a
    first-thought prefix (FTP).
    """
    prefixes = prefixes or {}
    tasks = [AgentTask(q.id, q.question, sample, prefixes.get(q.id)) for q in questions for sample in range(samples)]
    by_id = {q.id: q for q in questions}
    episodes = run_agent(tasks, generator, sandbox, agent, on_progress)
    rows = Rows([], [])
    for episode in episodes:
        question = by_id[episode.question_id]
        rows.episodes.append(episode_row(episode, question, kind, labels or {}, grade))
        rows.steps.extend(step_rows(episode, question))
    return rows


def episode_row(episode: Episode, question: Question, kind: str, labels: dict, grade: Grader) -> dict:
    verdict = grade(episode.prediction, question.gold, kind, error=episode.error)
    return {
        **labels,
        "dataset": question.dataset, "question_id": question.id, "sample_index": episode.sample_index,
        "question": question.question, "gold": question.answer, "prediction": episode.prediction,
        "correct": verdict.correct, "score": verdict.score, "grade_method": verdict.method,
        "excluded": verdict.excluded, "num_steps": episode.num_steps,
        "prompt_tokens": episode.prompt_tokens, "completion_tokens": episode.completion_tokens,
        "latency_s": episode.latency_s, "error": episode.error, "prefix": episode.prefix,
        "messages_json": json.dumps(episode.messages, ensure_ascii=False),
        "metadata_json": json.dumps({**question.metadata, "pred_norm": verdict.pred_norm,
                                     "gold_norm": verdict.gold_norm, "em": verdict.em, "f1": verdict.f1},
                                    ensure_ascii=False, default=str),
    }


def step_rows(episode: Episode, question: Question) -> list[dict]:
    return [{
        "dataset": question.dataset, "question_id": question.id, "sample_index": episode.sample_index,
        "step": record.step, "thought": record.thought, "code": record.code, "observation": record.observation,
        "error_kind": record.error_kind, "num_candidates": max(1, len(record.candidates)),
        "tool_calls": record.tool_calls, "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens, "latency_s": record.latency_s, "is_final": record.is_final,
        "assistant": record.assistant, "observation_message": record.observation_message,
        "candidates_json": json.dumps(record.candidates, ensure_ascii=False, default=str),
        "vote_json": json.dumps(record.vote, ensure_ascii=False, default=str),
    } for record in episode.steps]
