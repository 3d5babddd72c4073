"""Turn a model's action text into (thought, code), or a parse error to feed back as the observation.

Accepted, because real models write them all: ```` ```py ````, ```` ```python ````, ```` ```python3 ```` and
bare ```` ``` ```` fences; a missing ``Thought:`` or ``Code:`` label; a missing ``<end_code>``; a block left
open at the end (the stop string cut its closing fence); a fence closed at the end of a code line
(``print(x)``` ``); several code blocks (joined in order); ``<code>…</code>`` tags; and, as a last resort,
un-fenced Python after a ``Code:`` label when it parses. Fenced blocks tagged with another language
(```` ```text ````, ```` ```json ````) are not code. Anything after ``<end_code>`` or after a hallucinated
``Observation:`` line is ignored.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from agent_runtime.prompts import END_CODE

_CODE_LANGS = {"", "py", "python", "python3"}
_THOUGHT_LABEL = re.compile(r"^\s*(?:\*\*)?thought(?:\*\*)?\s*:(?:\*\*)?\s*", re.IGNORECASE)
_CODE_LABEL = re.compile(r"\s*(?:\*\*)?code(?:\*\*)?\s*:(?:\*\*)?\s*$", re.IGNORECASE)
_CODE_TAG = re.compile(r"<code>(.*?)(?:</code>|\Z)", re.DOTALL)
_RAW_CODE_LABEL = re.compile(r"^[ \t]*(?:\*\*)?code(?:\*\*)?[ \t]*:(?:\*\*)?[ \t]*\n", re.IGNORECASE | re.MULTILINE)

NO_CODE_ERROR = (
    "Error: no code block found in your answer. Write your next step exactly in this format:\n"
    "Thought: <your reasoning>\nCode:\n```py\n<python code>\n```" + END_CODE + "\n"
    "Call final_answer(answer) in the code when you know the answer."
)
EMPTY_CODE_ERROR = "Error: your code block is empty. Write the Python code to run inside the ```py block."


@dataclass
class ParsedAction:
    """A parsed action: ``code`` is None exactly when ``error`` (the text fed back to the model) is set.

    ``answer`` is the content of the last ``\\boxed{}`` of an action that has no code: the model answered
    in prose ("The total is \\boxed{42}.") instead of calling ``final_answer``. The engine may take it
    as the final answer (``AgentConfig.boxed_answer``); it is None whenever there is code.
    """

    thought: str
    code: str | None
    error: str | None
    answer: str | None = None


def parse_action(text: str) -> ParsedAction:
    """Parse one assistant action. Never raises: unparseable text gives ``ParsedAction(thought, None, error)``."""
    text = text.split(END_CODE, 1)[0]
    blocks, thought_end = _fenced_blocks(text)
    if not blocks:
        blocks, thought_end = _tagged_blocks(text)
    if not blocks:
        blocks, thought_end = _raw_code_after_label(text)
    thought = _clean_thought(text[:thought_end] if blocks else _cut_observation(text))
    if not blocks:
        return ParsedAction(thought=thought, code=None, error=NO_CODE_ERROR, answer=last_boxed(thought) or None)
    code = "\n\n".join(block.strip("\n").rstrip() for block in blocks if block.strip())
    if not code:
        return ParsedAction(thought=thought, code=None, error=EMPTY_CODE_ERROR)
    return ParsedAction(thought=thought, code=code, error=None)


def _fenced_blocks(text: str) -> tuple[list[str], int]:
    """Python blocks between ``` fences, and the offset where the first one opens (end of the thought)."""
    blocks: list[str] = []
    first_open = len(text)
    current: list[str] | None = None  # lines of the open python block
    in_other = False  # inside a fenced block of another language
    offset = 0
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if current is not None:
            if stripped.startswith("```"):
                blocks.append("".join(current))
                current = None
            elif stripped.endswith("```"):
                current.append(line.rstrip()[:-3])
                blocks.append("".join(current))
                current = None
            else:
                current.append(line)
        elif in_other:
            in_other = not stripped.startswith("```")
        elif stripped.startswith("```"):
            lang = stripped[3:].strip().lower()
            if lang in _CODE_LANGS:
                current = []
                first_open = min(first_open, offset)
            elif lang.endswith("```"):
                pass  # a one-line ```text``` span, not a block
            else:
                in_other = True
        elif blocks and stripped.startswith("Observation:"):
            break  # the model went on to invent the observation; the action ended before it
        offset += len(line)
    if current is not None:  # left open: the stop string (or the token limit) cut the closing fence
        blocks.append("".join(current))
    return blocks, first_open


def _tagged_blocks(text: str) -> tuple[list[str], int]:
    matches = list(_CODE_TAG.finditer(text))
    return [m.group(1) for m in matches], (matches[0].start() if matches else len(text))


def _raw_code_after_label(text: str) -> tuple[list[str], int]:
    """Un-fenced code after the last ``Code:`` line, accepted only when it is valid Python."""
    labels = list(_RAW_CODE_LABEL.finditer(text))
    if not labels:
        return [], len(text)
    code = _cut_observation(text[labels[-1].end():]).strip("\n")
    try:
        ast.parse(code)
    except SyntaxError:
        return [], len(text)
    return ([code], labels[-1].start()) if code.strip() else ([], len(text))


def _cut_observation(text: str) -> str:
    match = re.search(r"^\s*Observation:", text, re.MULTILINE)
    return text[: match.start()] if match else text


def _clean_thought(text: str) -> str:
    """Drop the ``Thought:`` label at the start and the ``Code:`` label at the end."""
    text = _THOUGHT_LABEL.sub("", text, count=1)
    return _CODE_LABEL.sub("", text).strip()


def last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, braces balanced."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        loose = re.findall(r"\\boxed\s+([^\s$]+)", text)  # "\boxed 5" (no braces) is valid LaTeX
        return loose[-1] if loose else None
    begin = starts[-1].end()
    depth = 1
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
    return None  # unbalanced: the output was cut off inside the box
