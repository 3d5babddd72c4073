"""Self-consistent action generation (SAG): choose one of N sampled actions by voting on what they did.

Every candidate has already run on its own copy of the episode state (the sandbox never mutates its
inputs, so a losing candidate's assignments exist only in the state it returned, which is dropped).
Candidates that failed (parse, execution, timeout, ... errors) do not vote. The others are grouped by
their observation — the stripped printed output together with the ``final_answer`` value, so two
candidates that print nothing but answer differently disagree — and the winner is the first candidate
of the largest group (ties go to the group that appeared first). If every candidate failed, the first
one is kept so its error is fed back to the model. With a single candidate (no SAG) the vote simply
keeps it, failed or not, which is the plain agent step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent_runtime.execution import ExecResult
from agent_runtime.generation import Completion
from agent_runtime.parsing import ParsedAction

if TYPE_CHECKING:
    from agent_runtime.sandbox import EpisodeState

NO_GROUP = -1  # the group index recorded for candidates that failed and did not vote


@dataclass
class Candidate:
    """One sampled action of one episode at one step, after it ran."""

    assistant: str  # the exact assistant message (prefix + generated text, terminator normalised)
    action: ParsedAction
    completion: Completion
    result: ExecResult
    state: EpisodeState | None  # the state after this action (the unchanged state if it did not run)

    @property
    def failed(self) -> bool:
        """True when the action could not be parsed or did not run cleanly."""
        return self.result.error_kind != "none"


@dataclass
class Vote:
    """The outcome of a vote: ``groups`` holds candidate indices, in order of first appearance."""

    winner: int
    groups: list[list[int]]
    all_failed: bool

    def group_of(self, index: int) -> int:
        """The group of candidate ``index``, or ``NO_GROUP`` if it failed."""
        for g, members in enumerate(self.groups):
            if index in members:
                return g
        return NO_GROUP


def observation_key(result: ExecResult) -> tuple[str, bool, str | None]:
    """What two candidates must share to agree: stripped output, whether they answered, and the answer."""
    return (result.observation.strip(), result.is_final, result.final_answer)


def vote(candidates: list[Candidate]) -> Vote:
    """Pick the winner among ``candidates`` (at least one); see the module docstring for the rule."""
    if not candidates:
        raise ValueError("vote needs at least one candidate")
    by_key: dict[tuple[str, bool, str | None], list[int]] = {}
    for i, candidate in enumerate(candidates):
        if not candidate.failed:
            by_key.setdefault(observation_key(candidate.result), []).append(i)
    groups = list(by_key.values())
    if not groups:
        return Vote(winner=0, groups=[], all_failed=True)
    largest = max(groups, key=len)  # max() keeps the first of equal sizes: ties go to the earliest group
    return Vote(winner=largest[0], groups=groups, all_failed=False)


def candidate_records(candidates: list[Candidate], outcome: Vote) -> list[dict]:
    """JSON-ready records of every candidate: its text, what it did and the group it voted in."""
    return [
        {
            "text": c.assistant,
            "observation": c.result.observation,
            "error_kind": c.result.error_kind,
            "final_answer": c.result.final_answer,
            "tool_calls": c.result.tool_calls,
            "completion_tokens": c.completion.completion_tokens,
            "group": outcome.group_of(i),
        }
        for i, c in enumerate(candidates)
    ]


def vote_record(outcome: Vote) -> dict:
    """JSON-ready summary of a vote: group sizes, the winning candidate and group."""
    return {
        "groups": [len(members) for members in outcome.groups],
        "winner": outcome.winner,
        "winner_group": outcome.group_of(outcome.winner),
        "all_failed": outcome.all_failed,
    }
