"""One Arrow schema per table. Writers cast to these; the DuckDB views expose exactly these columns.

A table lives in an artifact folder either as ``<table>.parquet`` or as parts ``<table>/part-*.parquet``.
JSON-valued columns (``*_json``) hold structured records (messages, candidates, metadata) as text so the
schemas stay flat and stable across versions.
"""

from __future__ import annotations

import pyarrow as pa

PASSAGES = pa.schema([
    ("id", pa.string()),
    ("title", pa.string()),
    ("text", pa.string()),
])

EPISODES = pa.schema([
    ("artifact_id", pa.string()),
    ("dataset", pa.string()),
    ("question_id", pa.string()),
    ("sample_index", pa.int32()),
    ("model", pa.string()),
    ("method", pa.string()),
    ("question", pa.string()),
    ("gold", pa.string()),
    ("prediction", pa.string()),
    ("correct", pa.bool_()),
    ("score", pa.float64()),
    ("grade_method", pa.string()),
    ("excluded", pa.bool_()),
    ("num_steps", pa.int32()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("latency_s", pa.float64()),
    ("error", pa.string()),
    ("prefix", pa.string()),
    ("messages_json", pa.string()),
    ("metadata_json", pa.string()),
])

STEPS = pa.schema([
    ("artifact_id", pa.string()),
    ("dataset", pa.string()),
    ("question_id", pa.string()),
    ("sample_index", pa.int32()),
    ("step", pa.int32()),
    ("thought", pa.string()),
    ("code", pa.string()),
    ("observation", pa.string()),
    ("error_kind", pa.string()),
    ("num_candidates", pa.int32()),
    ("tool_calls", pa.int32()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("latency_s", pa.float64()),
    ("is_final", pa.bool_()),
    ("assistant", pa.string()),       # the exact assistant message of this step (prefix included)
    ("observation_message", pa.string()),  # the exact user message fed back after it ("" when final)
    ("candidates_json", pa.string()),  # SAG: [{"text","observation","error_kind","group"}], "[]" without SAG
    ("vote_json", pa.string()),        # SAG: {"groups": [...sizes], "winner": i}, "{}" without SAG
])

PREDICTIONS = pa.schema(
    [(f.name, f.type) for f in EPISODES]
    + [
        ("adapter", pa.string()),
        ("shard", pa.int32()),
        ("em", pa.float64()),
        ("f1", pa.float64()),
        ("retrieval_calls", pa.int32()),
        ("parse_errors", pa.int32()),
        ("exec_errors", pa.int32()),
        ("level", pa.string()),
        ("steps_json", pa.string()),
    ]
)

METRICS = pa.schema([
    ("artifact_id", pa.string()),
    ("model", pa.string()),
    ("adapter", pa.string()),
    ("method", pa.string()),
    ("dataset", pa.string()),
    ("n", pa.int64()),
    ("n_excluded", pa.int64()),
    ("accuracy", pa.float64()),
    ("em", pa.float64()),
    ("f1", pa.float64()),
    ("mean_steps", pa.float64()),
    ("retrieval_calls", pa.float64()),
    ("parse_error_rate", pa.float64()),
    ("exec_error_rate", pa.float64()),
    ("tokens_per_question", pa.float64()),
    ("grade_timeouts", pa.int64()),    # scored episodes whose symbolic grading hit the time limit
    ("grader_version", pa.string()),   # evaluation.grading.GRADER_VERSION that scored the predictions
])

LOSSES = pa.schema([
    ("step", pa.int64()),
    ("epoch", pa.float64()),
    ("loss", pa.float64()),
    ("lr", pa.float64()),
    ("tokens", pa.int64()),
])

SFT_EXAMPLES = pa.schema([
    ("question_id", pa.string()),
    ("sample_index", pa.int32()),
    ("dataset", pa.string()),
    ("kind", pa.string()),            # "agent" | "cot"
    ("messages_json", pa.string()),   # the chat example: system, user, assistant/user turns
])

COT_SOLUTIONS = pa.schema([
    ("artifact_id", pa.string()),
    ("dataset", pa.string()),
    ("question_id", pa.string()),
    ("question", pa.string()),
    ("gold", pa.string()),
    ("text", pa.string()),             # the whole CoT solution
    ("answer", pa.string()),           # the extracted final answer
    ("correct", pa.bool_()),
    ("prefix", pa.string()),           # its first step, the FTP prefix ("" when there is none)
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("latency_s", pa.float64()),
])

# The opd stage: each iteration's student episodes and steps (the rollout's columns plus the iteration), every
# token the student generated with its log-prob under the teacher and under the sampling student, and the
# update's steps.
OPD_EPISODES = pa.schema([*EPISODES, ("iteration", pa.int32())])
OPD_STEPS = pa.schema([*STEPS, ("iteration", pa.int32())])

OPD_TOKENS = pa.schema([
    ("artifact_id", pa.string()),
    ("iteration", pa.int32()),
    ("dataset", pa.string()),
    ("question_id", pa.string()),
    ("sample_index", pa.int32()),
    ("step", pa.int32()),               # the agent step (assistant turn) the token belongs to
    ("segment", pa.string()),           # "thought" | "code" | "final" (the finalising action) | "stop" (<end_code>)
    ("position", pa.int32()),           # the token's index within its assistant turn
    ("token_id", pa.int32()),
    ("teacher_logprob", pa.float32()),  # log π_teacher(token | the student's context)
    ("student_logprob", pa.float32()),  # log π_student(token | context) under the adapter that sampled it
])

OPD_LOSSES = pa.schema([
    ("iteration", pa.int32()),
    ("step", pa.int64()),
    ("loss", pa.float64()),
    ("kl", pa.float64()),               # mean k1 reverse-KL estimate (log π_old − log π_T) on the step's tokens
    ("tokens", pa.int64()),
    ("clipped", pa.int64()),            # tokens whose advantage was clipped to ±kl_clip
    ("baseline", pa.float64()),         # b subtracted from the step's advantages (0 with opd.baseline: none)
    ("episodes", pa.int64()),
    ("step_time_s", pa.float64()),
])

# Table name -> schema; the DuckDB catalog creates one view per entry.
TABLES: dict[str, pa.Schema] = {
    "passages": PASSAGES,
    "episodes": EPISODES,
    "steps": STEPS,
    "predictions": PREDICTIONS,
    "metrics": METRICS,
    "losses": LOSSES,
    "sft_examples": SFT_EXAMPLES,
    "cot_solutions": COT_SOLUTIONS,
    "opd_episodes": OPD_EPISODES,
    "opd_steps": OPD_STEPS,
    "opd_tokens": OPD_TOKENS,
    "opd_losses": OPD_LOSSES,
}


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast ``table`` to ``schema``: missing nullable columns become nulls, extra columns are an error."""
    extra = set(table.column_names) - set(schema.names)
    if extra:
        raise ValueError(f"columns not in the schema: {sorted(extra)}")
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Build a table of ``schema`` from row dicts (unknown keys are an error, missing keys are null)."""
    extra = {k for row in rows for k in row} - set(schema.names)
    if extra:
        raise ValueError(f"fields not in the schema: {sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=schema)
