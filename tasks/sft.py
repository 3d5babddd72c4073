"""Prefect task of the ``sft`` stage: a student's training examples (``training.data``).

The agent-distilled student's come from the teacher's trajectories (the ``rollout`` artifact), filtered to
the correct ones; the CoT-distilled student's from the teacher's correct CoT solutions (``prefixes``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
from prefect import task

from common.errors import UserError
from storage.catalog import read_table
from storage.schemas import SFT_EXAMPLES
from storage.store import ArtifactRef, StagePlan
from tasks.artifacts import build_artifact
from training.data import agent_examples, cot_examples

if TYPE_CHECKING:
    from flows.config import PipelineConfig
    from flows.stages import StageOptions


@task(name="sft", task_run_name="sft-{kind}")
def build(plan: StagePlan, cfg: PipelineConfig, inputs: dict[str, ArtifactRef], kind: str,
          options: StageOptions) -> ArtifactRef:
    """The ``kind`` student's examples from its one input artifact."""
    (source,) = inputs.values()

    def write(artifact):
        if kind == "agent":
            rows, counts = agent_examples(read_table(source.path, "episodes"), read_table(source.path, "steps"),
                                          cfg.sft)
        else:
            rows, counts = cot_examples(read_table(source.path, "cot_solutions"))
        if not rows:
            raise UserError(f"no training examples: {source.stage} artifact {source.id} has no episode that passes "
                            f"the filter ({counts}); run more questions or samples, or use a stronger teacher")
        artifact.write_table("sft_examples", pa.Table.from_pylist(rows, schema=SFT_EXAMPLES), SFT_EXAMPLES)
        return {"sft_examples": len(rows)}, {"filter": counts, "kind": kind}

    return build_artifact(plan, write, "select kind, dataset, count(*) from sft_examples "
                                       "where artifact_id = '{id}' group by all")
