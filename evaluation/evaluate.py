"""Evaluation: models × methods × datasets, sharded, into ``predictions`` rows.

Methods (``MethodConfig``):
- ``cot``: chain-of-thought prompting, the answer extracted from the text (``\\boxed{}``, "answer is",
  last number);
- ``agent``: the CodeAct agent, greedy;
- ``agent`` with ``sag``: self-consistent action generation (N candidates, vote).
Each method names which model runs it: the base ``student`` (no adapter), the ``teacher``, or a
distilled student (``agent_student``/``cot_student``: the student with that adapter).

Questions go to shards by ``agent_runtime.rollout.part_of(question id, num_shards)``, so sharding is a
pure function of the id and each question is evaluated exactly once per (method, dataset).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent_runtime.cot import run_cot
from agent_runtime.engine import AgentConfig, AgentTask, SagConfig
from agent_runtime.rollout import run_questions
from common.errors import UserError
from evaluation.grading import extract_answer, grade
from questions.datasets import DatasetConfig, Question

TEST_SETS = (
    DatasetConfig(name="arith", source="builtin:arith", split="test", kind="math", num_questions=32),
    DatasetConfig(name="facts", source="builtin:facts", split="test", kind="qa"),
)


class MethodConfig(BaseModel):
    """One row of the results table: a model run with a method."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="label in tables and plots, e.g. 'agent+sag (agent-distilled)'")
    model: Literal["student", "teacher", "agent_student", "cot_student", "opd_student"] = Field(
        "student", description="which model: base student, teacher, or a distilled student (its adapter; "
                               "opd_student: the agent-distilled student after on-policy distillation)")
    mode: Literal["cot", "agent"] = Field("agent", description="CoT prompting or the CodeAct agent")
    prompt: Literal["teacher", "student"] = Field(
        "student", description="agent system prompt: full (tools + few-shot examples) or short")
    sag: bool = Field(False, description="self-consistent action generation (settings in evaluate.sag)")
    rag: bool = Field(False, description="cot mode: put the question's top search.top_k passages in the prompt "
                                         "(the paper's Distill + RAG row)")
    limit: int | None = Field(None, ge=1, description="take only the first N questions of each dataset for this "
                                                      "method (e.g. a slow reference row; its n says so)")

    @model_validator(mode="after")
    def _rag_is_for_cot(self) -> MethodConfig:
        if self.rag and self.mode != "cot":
            raise ValueError(f"method {self.name!r}: rag is for mode 'cot' (an agent retrieves with web_search)")
        return self


DEFAULT_METHODS = (
    MethodConfig(name="cot", model="student", mode="cot"),
    MethodConfig(name="agent", model="student", mode="agent", prompt="teacher"),
    MethodConfig(name="agent-distilled", model="agent_student", mode="agent"),
    MethodConfig(name="agent-distilled+sag", model="agent_student", mode="agent", sag=True),
)


class EvalConfig(BaseModel):
    """What is evaluated and how the work is split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    datasets: tuple[DatasetConfig, ...] = Field(TEST_SETS, description="held-out question sets")
    methods: tuple[MethodConfig, ...] = Field(DEFAULT_METHODS, description="model × method rows of the table")
    agent: AgentConfig = Field(AgentConfig(prompt="student"), description="agent settings (greedy by default)")
    sag: SagConfig = Field(SagConfig(enabled=True, n=4), description="SAG settings of methods with sag: true")
    cot_max_new_tokens: int = Field(512, ge=1, description="token limit of a CoT answer")
    num_shards: int = Field(2, ge=1, description="shards per (method, dataset); one Prefect task each")
    max_workers: int = Field(2, ge=1, description="shards run at once by the local runners")
    runner: Literal["threads", "processes", "dask"] = Field(
        "threads", description="how shards run: threads of the flow's process; processes, one per shard with "
                               "cpu_count // max_workers torch threads each; or a Dask cluster")
    address: str | None = Field(None, description="Dask scheduler address for runner 'dask' (None: a local cluster)")
    limit: int | None = Field(None, ge=1, description="take only the first N questions of each dataset")

    def only_methods(self, names: list[str]) -> EvalConfig:
        """This config with only the methods named (in the config's order); an unknown name is an error."""
        known = [m.name for m in self.methods]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise UserError(f"unknown evaluation method(s) {unknown}; the config has {known}")
        return self.model_copy(update={"methods": tuple(m for m in self.methods if m.name in names)})

    def distilled_models(self) -> set[str]:
        """The trained students (``agent_student``, ``cot_student``, ``opd_student``) some method evaluates."""
        return {m.model for m in self.methods} & {"agent_student", "cot_student", "opd_student"}


def agent_config_for(method: MethodConfig, cfg: EvalConfig) -> AgentConfig:
    sag = cfg.sag.model_copy(update={"enabled": True}) if method.sag else SagConfig()
    return cfg.agent.model_copy(update={"prompt": method.prompt, "sag": sag})


def evaluate_questions(questions: list[Question], kind: str, method: MethodConfig, cfg: EvalConfig,
                       generator, sandbox, labels: dict,
                       on_progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """``predictions`` rows for one shard (questions of one dataset) under one method."""
    if method.mode == "cot":
        search = sandbox.search if method.rag else None
        return cot_rows(questions, kind, generator, cfg, labels, search, on_progress)
    rows = run_questions(questions, kind, generator, sandbox, agent_config_for(method, cfg), grade,
                         labels=labels, on_progress=on_progress)
    steps_by_episode: dict[str, list[dict]] = {}
    for step in rows.steps:
        steps_by_episode.setdefault(step["question_id"], []).append(step)
    return [prediction_row(episode, steps_by_episode.get(episode["question_id"], [])) for episode in rows.episodes]


def prediction_row(episode: dict, steps: list[dict]) -> dict:
    """An episode row plus what the metrics need: EM/F1, retrieval calls, error counts, level, steps."""
    metadata = json.loads(episode["metadata_json"])
    kinds = [s["error_kind"] for s in steps]
    return {
        **episode, "em": metadata.get("em"), "f1": metadata.get("f1"),
        "retrieval_calls": sum(s["tool_calls"] for s in steps),
        "parse_errors": kinds.count("parse"),
        "exec_errors": sum(1 for k in kinds if k not in ("none", "parse")),
        "level": None if metadata.get("level") is None else str(metadata["level"]),
        "steps_json": json.dumps([{k: s[k] for k in ("step", "thought", "code", "observation", "error_kind",
                                                      "tool_calls", "completion_tokens")} for s in steps],
                                 ensure_ascii=False),
    }


def with_passages(question: str, search: Callable[[str], str]) -> str:
    """The question preceded by the passages ``search`` finds for it (retrieval-augmented CoT)."""
    return f"Passages that may help:\n{search(question)}\n\nQuestion: {question}"


COT_BATCH = 16  # questions per backend call; progress is reported after each


def cot_rows(questions: list[Question], kind: str, generator, cfg: EvalConfig, labels: dict,
             search: Callable[[str], str] | None = None,
             on_progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """CoT predictions; with ``search``, each prompt carries the question's retrieved passages (RAG).
    ``on_progress(finished, total)`` is called after every batch of ``COT_BATCH`` questions."""
    tasks = [AgentTask(q.id, with_passages(q.question, search) if search else q.question) for q in questions]
    results = run_cot(tasks, generator, cfg.cot_max_new_tokens, batch_size=COT_BATCH, on_progress=on_progress)
    rows = []
    for question, result in zip(questions, results):
        answer = extract_answer(result.text)
        verdict = grade(answer, question.gold, kind, error=None if answer else "no answer")
        rows.append({
            **labels, "dataset": question.dataset, "question_id": question.id, "sample_index": 0,
            "question": question.question, "gold": question.answer, "prediction": answer,
            "correct": verdict.correct, "score": verdict.score, "grade_method": verdict.method,
            "excluded": verdict.excluded, "num_steps": 0, "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens, "latency_s": result.latency_s,
            "error": None if answer else "no answer",
            "messages_json": json.dumps([{"role": "assistant", "content": result.text}], ensure_ascii=False),
            "metadata_json": json.dumps(question.metadata, ensure_ascii=False, default=str),
            "em": verdict.em, "f1": verdict.f1, "retrieval_calls": 0, "parse_errors": 0, "exec_errors": 0,
            "level": None if question.metadata.get("level") is None else str(question.metadata["level"]),
            "steps_json": "[]",
        })
    return rows
