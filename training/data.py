"""Filter graded trajectories into SFT examples (the ``sft_data`` stage).

Kept: correct episodes whose steps have no parse error. Execution errors the agent recovered from
are kept, as in the paper: they teach recovery. Each kept episode becomes the exact conversation the
teacher had, with the teacher's system prompt (tools, few-shot examples) replaced by the student's
short one, so the student learns to act without the examples. Consecutive user turns (the last
observation followed by the "answer now" turn at ``max_steps``) are joined into one, because chat
examples alternate strictly.
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from agent_runtime.prompts import COT_SYSTEM_PROMPT, STUDENT_SYSTEM_PROMPT
from training.examples import cot_messages, validate_messages


class SftDataConfig(BaseModel):
    """Which trajectories become training examples."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    require_correct: bool = Field(True, description="keep only episodes whose answer was graded correct")
    drop_parse_errors: bool = Field(True, description="drop episodes with any unparseable action")
    max_per_question: int | None = Field(None, ge=1, description="keep at most N episodes per question")


def agent_examples(episodes: pa.Table, steps: pa.Table, cfg: SftDataConfig) -> tuple[list[dict], dict]:
    """``sft_examples`` rows (kind "agent") from a trajectories artifact, and the filter's counts."""
    parse_failed = {(q, s) for q, s, kind in zip(steps.column("question_id").to_pylist(),
                                                steps.column("sample_index").to_pylist(),
                                                steps.column("error_kind").to_pylist()) if kind == "parse"}
    counts: Counter = Counter(episodes=episodes.num_rows)
    kept_per_question: Counter = Counter()
    rows = []
    for episode in sorted(episodes.to_pylist(), key=lambda e: (e["dataset"], e["question_id"], e["sample_index"])):
        key = (episode["question_id"], episode["sample_index"])
        if cfg.require_correct and not episode["correct"]:
            counts["dropped_incorrect"] += 1
        elif cfg.drop_parse_errors and key in parse_failed:
            counts["dropped_parse_error"] += 1
        elif cfg.max_per_question and kept_per_question[episode["question_id"]] >= cfg.max_per_question:
            counts["dropped_over_quota"] += 1
        else:
            kept_per_question[episode["question_id"]] += 1
            messages = student_conversation(json.loads(episode["messages_json"]))
            rows.append({"question_id": episode["question_id"], "sample_index": episode["sample_index"],
                         "dataset": episode["dataset"], "kind": "agent",
                         "messages_json": json.dumps(messages, ensure_ascii=False)})
    counts["kept"] = len(rows)
    return rows, dict(counts)


def student_conversation(messages: list[dict]) -> list[dict]:
    """The teacher's conversation with the student system prompt and strictly alternating turns."""
    if not messages or messages[0]["role"] != "system":
        raise ValueError("a stored conversation must start with its system prompt")
    merged = [{"role": "system", "content": STUDENT_SYSTEM_PROMPT}]
    for message in messages[1:]:
        if merged[-1]["role"] == message["role"] and message["role"] == "user":
            merged[-1] = {"role": "user", "content": merged[-1]["content"] + "\n\n" + message["content"]}
        else:
            merged.append({"role": message["role"], "content": message["content"]})
    validate_messages(merged)
    return merged


def cot_examples(solutions: pa.Table) -> tuple[list[dict], dict]:
    """``sft_examples`` rows (kind "cot") from the teacher's correct CoT solutions (the baseline's data)."""
    rows = []
    for solution in solutions.to_pylist():
        if solution["correct"]:
            messages = cot_messages(COT_SYSTEM_PROMPT, solution["question"], solution["text"])
            rows.append({"question_id": solution["question_id"], "sample_index": 0, "dataset": solution["dataset"],
                         "kind": "cot", "messages_json": json.dumps(messages, ensure_ascii=False)})
    return rows, {"solutions": solutions.num_rows, "kept": len(rows)}
