"""The contract between the agent engine and the sandboxed executor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ErrorKind = Literal["none", "parse", "execution", "timeout", "memory", "forbidden", "crash"]


@dataclass
class ExecResult:
    """What one action did.

    ``observation`` is what the model is shown next (captured prints, or the error text).
    ``final_answer`` is ``str(value)`` when the code called ``final_answer(value)``.
    """

    observation: str
    error_kind: ErrorKind = "none"
    error: str | None = None
    is_final: bool = False
    final_answer: str | None = None
    tool_calls: int = 0
    duration_s: float = 0.0
