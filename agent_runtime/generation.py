"""The one contract every model backend implements.

A backend takes a batch of conversations and returns, for each, ``n`` completions. A conversation
may end with a partial assistant message that the model must *continue* (the first-thought prefix):
the returned text is only the continuation, the prefix is not repeated. A backend that can also
*score* given completions (``score``) returns their per-token log-probabilities under the model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol

from common.errors import ServiceUnavailable, UserError

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass(frozen=True)
class Sampling:
    """How to sample. temperature == 0 means greedy (and n must be 1 unless the backend repeats)."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        # Checked here once, so a bad value fails at the caller rather than deep inside a backend.
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"Sampling needs n >= 1 and max_new_tokens >= 1, got n={self.n}, "
                f"max_new_tokens={self.max_new_tokens}"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"Sampling needs temperature >= 0 and 0 < top_p <= 1, got "
                f"temperature={self.temperature}, top_p={self.top_p}"
            )
        if any(not s for s in self.stop):
            raise ValueError(f"Sampling.stop holds an empty string: {self.stop!r}")


@dataclass(frozen=True)
class Request:
    """One conversation; when ``continue_final`` is true the last message is an assistant prefix."""

    messages: list[Message]
    continue_final: bool = False
    seed: int | None = None  # per-conversation seed (derived from question id + sample index)
    label: str | None = None  # names the request in error messages: question id, sample, step


@dataclass
class Completion:
    """One sampled continuation. ``text`` excludes the stop string that ended it."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    latency_s: float
    stop: str | None = None  # the stop string that ended generation, if any


@dataclass
class Generation:
    """The ``n`` completions for one request."""

    completions: list[Completion] = field(default_factory=list)


@dataclass
class Scored:
    """The log-probabilities of one given completion under a model (what ``Generator.score`` returns).

    ``token_ids`` are the completion's tokens as the model's tokenizer splits the completion text alone
    (``tokenizer(text, add_special_tokens=False)``), placed after the request's prompt tokens (the prompt
    ``generate`` would decode from, ``continue_final`` included). ``logprobs[k]`` is the natural-log
    probability of ``token_ids[k]`` given the prompt and ``token_ids[:k]``, from the raw logits
    (temperature 1, no top-p). An empty completion has no tokens.
    """

    token_ids: list[int]
    logprobs: list[float]

    @property
    def total(self) -> float:
        """The log-probability of the whole completion."""
        return sum(self.logprobs)


class GenerationError(UserError, RuntimeError):
    """A backend could not produce completions (unreachable endpoint, bad model, ...)."""


class EndpointUnavailable(GenerationError, ServiceUnavailable):
    """A model server did not answer (refused, timed out, 5xx) after the backend's own retries."""


class Generator(Protocol):
    """A model backend."""

    name: str

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Generation]:
        """Return one Generation (with ``sampling.n`` completions) per request, in order."""
        ...

    def score(self, requests: list[Request], completions: list[str]) -> list[Scored]:
        """The log-probs of ``completions[i]`` after the prompt of ``requests[i]``, one ``Scored`` per pair.

        Backends that cannot score given tokens (llama.cpp's server) raise a ``GenerationError``.
        """
        ...

    def close(self) -> None:
        """Release the model / connections."""
        ...


def sample_seed(request: Request, sampling: Sampling, index: int) -> int:
    """The seed of sample ``index`` (0 ≤ index < n) of ``request``; every backend seeds sample j with it.

    It mixes ``sampling.seed``, ``request.seed`` and ``index``, so the same (request seed, sampling,
    index) gives the same sample whatever else shares the batch, and the n samples of a request differ.
    The value is below 2**31 because some servers (llama.cpp) keep seeds as 32-bit integers.
    """
    digest = hashlib.blake2b(f"{sampling.seed}:{request.seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 33


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, str | None]:
    """``text`` up to the earliest stop string, and that stop string (None when none occurs)."""
    cuts = [(text.find(s), s) for s in stop if s in text]
    if not cuts:
        return text, None
    index, matched = min(cuts, key=lambda cut: (cut[0], -len(cut[1])))
    return text[:index], matched
