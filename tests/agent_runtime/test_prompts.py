"""The CodeAct prompts: what each system prompt contains, and the action format round trip."""

from __future__ import annotations

import re

import pytest

from agent_runtime.parsing import parse_action
from agent_runtime.prompts import (
    END_CODE,
    STOP_SEQUENCES,
    STUDENT_SYSTEM_PROMPT,
    TEACHER_SYSTEM_PROMPT,
    finalize_message,
    format_action,
    observation_message,
    question_message,
    system_prompt,
    thought_prefix,
)


def _example_actions(prompt: str) -> list[str]:
    return re.findall(r"^Thought:.*?<end_code>", prompt, flags=re.DOTALL | re.MULTILINE)


def test_teacher_prompt_has_tools_format_and_examples() -> None:
    prompt = system_prompt("teacher")
    assert prompt == TEACHER_SYSTEM_PROMPT
    for needle in ("web_search(query: str) -> str", "final_answer(answer)", "```py", END_CODE, "Observation:"):
        assert needle in prompt
    actions = _example_actions(prompt)
    assert len(actions) >= 6  # three worked examples with several steps each
    assert prompt.count("Task:") >= 3


def test_every_example_action_parses_and_is_canonical() -> None:
    for text in _example_actions(TEACHER_SYSTEM_PROMPT)[1:]:  # [0] is the format template
        action = parse_action(text)
        assert action.error is None, text
        assert format_action(action.thought, action.code) == text


def test_student_prompt_is_short_and_has_no_examples() -> None:
    prompt = system_prompt("student")
    assert prompt == STUDENT_SYSTEM_PROMPT
    assert "web_search" in prompt and "final_answer" in prompt and END_CODE in prompt
    assert "Task:" not in prompt and "Observation:\n" not in prompt
    assert len(prompt) < len(TEACHER_SYSTEM_PROMPT) / 4


def test_unknown_prompt_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown prompt kind 'tutor'"):
        system_prompt("tutor")  # type: ignore[arg-type]


def test_messages() -> None:
    assert question_message("  What is 2+2? ") == {"role": "user", "content": "Task: What is 2+2?"}
    assert observation_message("4") == {"role": "user", "content": "Observation:\n4"}
    final = finalize_message()
    assert final["role"] == "user" and "final_answer" in final["content"]


def test_format_action_round_trips_through_the_parser() -> None:
    text = format_action("  compute it \n", "\nfor i in range(3):\n    print(i)\n\n")
    assert text == "Thought: compute it\nCode:\n```py\nfor i in range(3):\n    print(i)\n```<end_code>"
    action = parse_action(text)
    assert (action.thought, action.code, action.error) == ("compute it", "for i in range(3):\n    print(i)", None)


def test_stop_sequences_and_prefix() -> None:
    assert STOP_SEQUENCES == ("<end_code>", "Observation:")
    assert thought_prefix(" First, find the composer.\n") == "Thought: First, find the composer."
