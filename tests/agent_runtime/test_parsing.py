"""parse_action: the variants real models write, and the errors fed back when there is no code."""

from __future__ import annotations

import pytest

from agent_runtime.parsing import EMPTY_CODE_ERROR, NO_CODE_ERROR, parse_action


@pytest.mark.parametrize(
    "text",
    [
        "Thought: add them\nCode:\n```py\nx = 1 + 2\nprint(x)\n```<end_code>",
        "Thought: add them\nCode:\n```python\nx = 1 + 2\nprint(x)\n```",
        "Thought: add them\nCode:\n```Python3\nx = 1 + 2\nprint(x)\n```\n",
        "Thought: add them\n```\nx = 1 + 2\nprint(x)\n```<end_code>",
        "add them\n\n```py\nx = 1 + 2\nprint(x)\n```",
        # the stop string cut before the closing fence
        "Thought: add them\nCode:\n```py\nx = 1 + 2\nprint(x)\n",
        # closing fence glued to the last code line
        "Thought: add them\nCode:\n```py\nx = 1 + 2\nprint(x)```<end_code>",
        # markdown-bold labels
        "**Thought:** add them\n**Code:**\n```py\nx = 1 + 2\nprint(x)\n```",
        # <code> tags
        "Thought: add them\n<code>\nx = 1 + 2\nprint(x)\n</code>",
        # un-fenced but valid python after Code:
        "Thought: add them\nCode:\nx = 1 + 2\nprint(x)\n",
    ],
)
def test_accepts_common_variants(text: str) -> None:
    action = parse_action(text)
    assert action.error is None
    assert action.code == "x = 1 + 2\nprint(x)"
    assert action.thought == "add them"


def test_joins_several_blocks_and_ignores_other_languages() -> None:
    text = (
        "Thought: two parts\n```text\nnot code\n```\n"
        "Code:\n```py\na = 1\n```\nand\n```py\nprint(a)\n```<end_code>"
    )
    action = parse_action(text)
    assert action.code == "a = 1\n\nprint(a)"
    assert action.thought.startswith("two parts")


def test_ignores_text_after_end_code_and_invented_observations() -> None:
    text = "Thought: t\nCode:\n```py\nprint(1)\n```\nObservation:\n1\n```py\nprint(2)\n```"
    assert parse_action(text).code == "print(1)"
    text = "Thought: t\nCode:\n```py\nprint(1)\n```<end_code>\n```py\nprint(2)\n```"
    assert parse_action(text).code == "print(1)"


def test_keeps_indentation_inside_the_block() -> None:
    text = "Thought: loop\nCode:\n```py\nfor i in range(2):\n    print(i)\n```"
    assert parse_action(text).code == "for i in range(2):\n    print(i)"


@pytest.mark.parametrize(
    "text",
    [
        "Thought: I think the answer is 42.",
        "",
        "Thought: prose after a label\nCode:\nI will now add the numbers together.",
        "Thought: only a text block\n```text\n1 + 1\n```",
    ],
)
def test_no_code_is_a_parse_error_with_instructions(text: str) -> None:
    action = parse_action(text)
    assert action.code is None
    assert action.error == NO_CODE_ERROR
    assert "```py" in action.error and "final_answer" in action.error


def test_empty_block_is_a_parse_error() -> None:
    action = parse_action("Thought: nothing\nCode:\n```py\n\n```<end_code>")
    assert action.code is None and action.error == EMPTY_CODE_ERROR
    assert action.thought == "nothing"


def test_thought_without_code_is_still_recorded() -> None:
    action = parse_action("Thought: I am not sure what to do.")
    assert action.thought == "I am not sure what to do."
