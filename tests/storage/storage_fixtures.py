"""Helpers of the storage tests (a helper module, not a test module): a rollout-like artifact written part by
part, as the real stages write theirs, and a writer process that holds its lock until told (or killed).

Run as a script (``python storage_fixtures.py HOME CONTROL`` with the checkout on PYTHONPATH), it builds
the artifact and stops after its first part, holding the lock, until ``CONTROL/release`` exists.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from storage.schemas import EPISODES
from storage.store import ArtifactStore, StagePlan, part_name
from tasks.artifacts import Written, build_artifact

PARTS = 3
ROWS_PER_PART = 4


def plan(home: Path, parts: int = PARTS) -> StagePlan:
    return ArtifactStore(home).plan_stage("rollout", {"parts": parts, "rows": ROWS_PER_PART}, code="storage-test")


def episodes(part: int, prediction_bytes: int = 8) -> pa.Table:
    """Part ``part``'s rows: the same for every writer; predictions are random hex of ``prediction_bytes``
    bytes (incompressible, so a part's size on disk is known)."""
    rng = random.Random(part)
    rows = [{"question_id": f"q{part * ROWS_PER_PART + i}", "dataset": "d", "correct": True,
             "prediction": rng.randbytes(prediction_bytes).hex()} for i in range(ROWS_PER_PART)]
    return pa.Table.from_pylist(rows)


def write_parts(artifact, parts: int = PARTS, prediction_bytes: int = 8,
                after_part: Callable[[int], None] = lambda part: None) -> Written:
    """Write the parts not on disk yet (a finished part is kept, as the rollout stage keeps them)."""
    for part in range(parts):
        if not (artifact.path / "episodes" / part_name(part)).exists():
            artifact.write_table("episodes", episodes(part, prediction_bytes), EPISODES, part=part)
            after_part(part)
    return {"episodes": parts * ROWS_PER_PART}, {}


def hold(home: Path, control: Path) -> None:
    """Build the artifact, stopping after part 0 (``CONTROL/holding``) until ``CONTROL/release`` exists."""
    def pause(part: int) -> None:
        if part == 0:
            (control / "holding").touch()
            while not (control / "release").exists():
                time.sleep(0.05)

    build_artifact(plan(home), lambda artifact: write_parts(artifact, after_part=pause), "")


if __name__ == "__main__":
    hold(Path(sys.argv[1]), Path(sys.argv[2]))
