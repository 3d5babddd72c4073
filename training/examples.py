"""Trajectories and CoT solutions → chat examples → token ids with assistant-only labels.

A kept agent trajectory becomes one chat example in the student's format::

    system (short prompt), user (question),
    assistant (thought + code action), user (observation), ..., assistant (the ``final_answer`` action)

and a CoT solution becomes ``system, user (question), assistant (solution)``. Both are tokenised by
:func:`tokenize_example`, which renders them with the student tokenizer's chat template and labels
only the tokens the model itself generates in assistant turns (the content and the end-of-turn token);
every other token (system, question, observations, role headers, the template's newlines) is -100.

The assistant spans are found by rendering prefixes of the conversation, never by searching for
role strings: for an assistant turn at index ``i``, the turn starts where the rendering of
``messages[:i]`` with the generation prompt ends, and it ends where the rendering of
``messages[:i + 1]`` ends. That only works when each prefix renders to a token-prefix of the full
conversation; templates that re-render history (e.g. strip earlier reasoning) are rejected with a
:class:`TemplateError` instead of silently mislabelling.

Over-long examples (``overflow``):
- ``"truncate"``: keep the conversation up to the end of the last assistant turn that fits in
  ``max_length`` tokens and cut everything after it (later observations and actions). Every kept
  token keeps its exact left context, so the labels stay what the model would see at inference.
  When not even the first assistant turn fits, the example is dropped.
- ``"drop"``: drop every example longer than ``max_length``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.errors import UserError

IGNORE_INDEX = -100

# A probe conversation for check_template: distinct contents so each can be found in the rendering.
_PROBE = [
    {"role": "system", "content": "PROBE-SYSTEM"},
    {"role": "user", "content": "PROBE-QUESTION"},
    {"role": "assistant", "content": "PROBE-ACTION-1"},
    {"role": "user", "content": "PROBE-OBSERVATION-1"},
    {"role": "assistant", "content": "PROBE-ACTION-2"},
]


class TemplateError(UserError, ValueError):
    """The student's chat template cannot render the training conversations faithfully."""


class ExampleError(ValueError):
    """A chat example does not have the required shape."""


@dataclass
class TokenizedExample:
    """One training sequence: ``labels[i]`` is ``input_ids[i]`` inside assistant turns, else -100."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # later turns were cut to fit max_length


def agent_messages(system_prompt: str, question: str, steps: list[tuple[str, str]]) -> list[dict]:
    """The chat example of one agent trajectory.

    ``steps`` holds ``(assistant_text, observation_user_text)`` per step, exactly as generated and fed
    back. The last step's observation is dropped: the example ends with the final action.
    """
    if not steps:
        raise ExampleError(f"trajectory for question {question[:80]!r} has no steps")
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    for index, (assistant_text, observation_text) in enumerate(steps):
        messages.append({"role": "assistant", "content": assistant_text})
        if index < len(steps) - 1:
            messages.append({"role": "user", "content": observation_text})
    return messages


def cot_messages(system_prompt: str, question: str, solution: str) -> list[dict]:
    """The chat example of one CoT solution (the distillation baseline): question → solution."""
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": question},
        {"role": "assistant", "content": solution},
    ]


def validate_messages(messages: list[dict], repeated_user: bool = False) -> None:
    """Raise ExampleError unless ``messages`` is system, user, then user/assistant alternating, ending
    with an assistant turn, every message a ``{"role", "content": str}`` dict. ``repeated_user``: an
    assistant turn may follow several user messages (an agent episode as the engine sends it)."""
    if len(messages) < 3:
        raise ExampleError(f"a chat example needs system, user and assistant messages, got {len(messages)}")
    for index, message in enumerate(messages):
        if set(message) != {"role", "content"} or not isinstance(message["content"], str):
            raise ExampleError(f"message {index} must be {{'role', 'content': str}}, got keys {sorted(message)}")
        if index == 0:
            expected = ("system",)
        elif repeated_user and index > 1 and messages[index - 1]["role"] == "user":
            expected = ("user", "assistant")
        else:
            expected = ("user",) if index == 1 or messages[index - 1]["role"] == "assistant" else ("assistant",)
        if message["role"] not in expected:
            raise ExampleError(f"message {index} has role {message['role']!r}, "
                               f"expected {' or '.join(repr(role) for role in expected)}")
    if messages[-1]["role"] != "assistant":
        raise ExampleError("a chat example must end with an assistant message")


def _render_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    """Token ids of the template rendering (the template adds any BOS itself, so no special tokens)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _model_name(tokenizer) -> str:
    return str(tokenizer.name_or_path) or type(tokenizer).__name__


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    """The full rendering's ids and the ``[start, end)`` token span of each assistant turn.

    A span covers the turn's content and its end-of-turn token (the tokenizer's EOS, which the model
    generates to stop) but not scaffolding the template appends after it (e.g. a newline).
    Raises TemplateError when a prefix does not render as a token-prefix of the whole conversation.
    """
    full = _render_ids(tokenizer, messages, generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_ids = _render_ids(tokenizer, messages[:index], generation_prompt=True)
        end_ids = _render_ids(tokenizer, messages[: index + 1], generation_prompt=False)
        for prefix, what in ((start_ids, "generation prompt"), (end_ids, "assistant turn")):
            if full[: len(prefix)] != prefix:
                raise TemplateError(
                    f"chat template of {_model_name(tokenizer)!r}: rendering the first {index} messages "
                    f"(up to the {what} of message {index}) is not a token-prefix of the whole "
                    "conversation, so assistant tokens cannot be located by prefix rendering; "
                    "use a model whose template renders history unchanged"
                )
        start, end = len(start_ids), len(end_ids)
        if end <= start:
            raise TemplateError(
                f"chat template of {_model_name(tokenizer)!r} renders assistant message {index} as no tokens"
            )
        turn = full[start:end]
        if tokenizer.eos_token_id in turn:
            # Cut after the last EOS: what follows it is template scaffolding, never generated.
            end = start + len(turn) - turn[::-1].index(tokenizer.eos_token_id)
        spans.append((start, end))
    return full, spans


def tokenize_example(
    tokenizer, messages: list[dict], max_length: int, overflow: Literal["truncate", "drop"]
) -> TokenizedExample | None:
    """Tokenise one chat example with labels only on assistant tokens.

    Returns None when the example is dropped (longer than ``max_length`` with ``overflow="drop"``, or
    its first assistant turn alone does not fit with ``overflow="truncate"``). See the module
    docstring for the truncation rule. Raises ExampleError for a malformed example and TemplateError
    when the template cannot be labelled by prefix rendering.
    """
    validate_messages(messages)
    full, spans = assistant_spans(tokenizer, messages)
    truncated = False
    if len(full) > max_length:
        fitting = [span for span in spans if span[1] <= max_length]
        if overflow == "drop" or not fitting:
            return None
        spans, full, truncated = fitting, full[: fitting[-1][1]], True
    labels = [IGNORE_INDEX] * len(full)
    for start, end in spans:
        labels[start:end] = full[start:end]
    return TokenizedExample(input_ids=full, labels=labels, truncated=truncated)


def check_template(tokenizer, model_spec: str) -> None:
    """Raise TemplateError unless the tokenizer's chat template renders system, user and alternating
    assistant/user (observation) turns, each message's content once and in order, with prefix
    renderings that are token-prefixes of the whole (so assistant labels can be computed)."""
    if not tokenizer.chat_template:
        raise TemplateError(f"model {model_spec!r} has no chat template; the student must be a chat model")
    if tokenizer.eos_token_id is None:
        raise TemplateError(f"model {model_spec!r}: the tokenizer has no EOS token to end assistant turns")
    try:
        text = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    except Exception as error:  # jinja raise_exception(...) and friends: the template rejects the turns
        raise TemplateError(
            f"chat template of model {model_spec!r} cannot render system/user/assistant/user(observation) "
            f"turns: {type(error).__name__}: {error}"
        ) from error
    position = 0
    for message in _PROBE:
        found = text.find(message["content"], position)
        if found < 0 or text.count(message["content"]) != 1:
            raise TemplateError(
                f"chat template of model {model_spec!r} does not render the {message['role']} message "
                f"{message['content']!r} exactly once and in order (rendered: {text[:300]!r})"
            )
        position = found + len(message["content"])
    try:
        assistant_spans(tokenizer, _PROBE)
    except TemplateError as error:
        raise TemplateError(f"model {model_spec!r}: {error}") from error
