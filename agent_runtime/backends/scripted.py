"""A fake model that replays scripted completions, so tests drive the real engine without a model.

Completions come either from a list, consumed in call order (request by request, sample by sample), or
from a function of ``(request, sample_index)``. Like a real backend it honours stop strings (the text is
cut before the earliest one, which is reported in ``Completion.stop``) and ``max_new_tokens``; tokens are
counted as whitespace-separated words. Every call is recorded in ``calls`` for tests to inspect.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from agent_runtime.generation import (
    Completion,
    Generation,
    GenerationError,
    Request,
    Sampling,
    Scored,
    cut_at_stop,
)

Script = list[str] | Callable[[Request, int], str]


class ScriptedGenerator:
    """Replays completions; see the module docstring."""

    name = "scripted"

    def __init__(self, completions: Script) -> None:
        self._script = completions
        self._next = 0  # index of the next completion when the script is a list
        self.calls: list[tuple[list[Request], Sampling]] = []

    @classmethod
    def from_file(cls, path: str | Path) -> ScriptedGenerator:
        """Load completions from a JSON list of strings, or JSONL with one string (or {"text": ...}) per line."""
        path = Path(path)
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            try:
                items = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
            if not isinstance(items, list):
                raise ValueError(f"{path}: expected a JSON list of completion strings")
            return cls([_completion_text(item, f"{path}: item {i}") for i, item in enumerate(items)])
        texts = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from exc
            texts.append(_completion_text(item, f"{path}:{lineno}"))
        return cls(texts)

    @property
    def requests(self) -> list[Request]:
        """Every request received, in order, flattened over calls."""
        return [request for requests, _ in self.calls for request in requests]

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Generation]:
        """One Generation with ``sampling.n`` scripted completions per request."""
        self.calls.append((list(requests), sampling))
        generations = []
        for request in requests:
            prompt_tokens = sum(len(m["content"].split()) for m in request.messages)
            completions = [
                _finish(self._text(request, k), sampling, prompt_tokens) for k in range(sampling.n)
            ]
            generations.append(Generation(completions=completions))
        return generations

    def score(self, requests: list[Request], completions: list[str]) -> list[Scored]:
        """A script has no model to score with."""
        raise GenerationError("the scripted generator replays text; it has no model to score completions with")

    def close(self) -> None:
        """Nothing to release."""

    def _text(self, request: Request, sample_index: int) -> str:
        if callable(self._script):
            return self._script(request, sample_index)
        if self._next >= len(self._script):
            raise GenerationError(
                f"scripted generator ran out of completions after {len(self._script)}; "
                f"the script needs more entries for request {len(self.requests)}"
            )
        text = self._script[self._next]
        self._next += 1
        return text


def _finish(text: str, sampling: Sampling, prompt_tokens: int) -> Completion:
    """Apply stop strings, then the token limit, the way a real backend would."""
    text, stop = cut_at_stop(text, sampling.stop)
    words = text.split()
    if len(words) > sampling.max_new_tokens:
        cut = _offset_after_words(text, sampling.max_new_tokens)
        return Completion(text[:cut], prompt_tokens, sampling.max_new_tokens, "length", 0.0, None)
    return Completion(text, prompt_tokens, len(words), "stop", 0.0, stop)


def _offset_after_words(text: str, count: int) -> int:
    """The character offset just after the ``count``-th whitespace-separated word."""
    offset = 0
    for _ in range(count):
        while text[offset].isspace():
            offset += 1
        while offset < len(text) and not text[offset].isspace():
            offset += 1
    return offset


def _completion_text(item: object, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and "text" in item and isinstance(item["text"], str):
        return item["text"]
    raise ValueError(f"{where}: expected a string or an object with a string 'text', got {type(item).__name__}")
