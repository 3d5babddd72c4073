"""Which failed task runs Prefect retries: transient faults only.

A retry is for what can go differently the second time: a server that did not answer, a worker that
was killed, a full disk that was freed. A ``UserError`` (a malformed dataset, corpus or adapter, an
unknown model) fails the same way every time, so the task fails at once instead of after its retry
delay; ``ServiceUnavailable`` and ``DiskFull`` are the user errors that are retried. Every stage task with
``retries`` sets ``retry_condition_fn=is_transient``.
"""

from __future__ import annotations

from common.errors import DiskFull, ServiceUnavailable, UserError


def is_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: False when the run failed on input the user has to fix."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, ServiceUnavailable | DiskFull) or not isinstance(error, UserError)


TRANSIENT_RETRIES = {"retries": 1, "retry_delay_seconds": 5, "retry_condition_fn": is_transient}
"""The retry policy of every stage task: once, after 5 s, and only for a transient failure."""
