"""Progress that shows in the terminal (tqdm) and in the Prefect UI (a progress artifact)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from tasks.artifacts import in_prefect_run


class Progress:
    """A tqdm bar plus, inside a Prefect run, a progress artifact updated at most every 2 %."""

    def __init__(self, total: int, description: str):
        self.total = max(total, 1)
        self.bar = tqdm(total=total, desc=description, unit="ep", file=sys.stderr, dynamic_ncols=True)
        self.artifact_id = None
        self.reported = -1.0
        if in_prefect_run():
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(progress=0.0, description=description)

    def update(self, done: int) -> None:
        self.bar.update(done - self.bar.n)
        percent = 100.0 * done / self.total
        if self.artifact_id is not None and percent - self.reported >= 2.0:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, progress=percent)
            self.reported = percent

    def close(self) -> None:
        self.update(self.total)
        self.bar.close()
