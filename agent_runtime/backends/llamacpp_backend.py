"""llama.cpp backend: a GGUF model served by xllamacpp's embedded llama.cpp server in a child process.

``LlamaCppGenerator`` starts ``agent_runtime.backends.llamacpp_server`` (``cfg.slots`` parallel slots,
continuous batching, prompt cache) on a free loopback port (``services.processes``), waits until its
``/health`` answers, and sends requests through the OpenAI-compatible client (``OpenAIGenerator``) with
``cfg.slots`` requests in flight, so a batch of agent episodes is decoded together. The server's own
endpoints (``/health``, ``/slots``, ``/metrics``) are called through ``api``, a ``ServiceClient`` of its
root. ``close()`` stops the server; the server also dies with this process. A PEFT LoRA adapter (``cfg.adapter``) is converted to a GGUF LoRA adapter once
(``lora_gguf.gguf_adapter_for``) and applied by the server.

An assistant prefix (FTP) is continued through the chat API: llama.cpp's server prefills a trailing
assistant message and returns it with its continuation; the prefix is cut off here.

A batch whose requests share a system message (the agent's long prompt) gets it processed once: slot 0
processes the system message alone, the server saves that slot's KV cache to a file and restores it into
every other slot, so each slot starts the batch with the prefix cached (``share_prefix``; once per
system message and server). Without it every slot would process the prompt itself.

If the server dies (killed, out of memory), the next call raises one ``GenerationError`` that names
the backend, the model, the exit status and the server's last log lines.

A server that stops making progress (stopped, starved of CPU, hung) is caught by its stall watchdog
(``llamacpp_watchdog``): after ``cfg.stall_timeout_s`` without progress it is killed and the waiting
call raises one ``ServerStalled`` naming the server's pid, port and model, its slots and the requests
they held. Requests have no read timeout of their own (a slow but working server is waited for); the
next call after a stall starts a new server, so the stage's one task retry runs on a fresh one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from agent_runtime.backends import BackendConfig
from agent_runtime.backends.llamacpp_watchdog import ServerStalled, Watchdog
from agent_runtime.backends.openai_backend import OpenAIGenerator
from agent_runtime.generation import (
    EndpointUnavailable,
    Generation,
    GenerationError,
    Request,
    Sampling,
    Scored,
    sample_seed,
)
from common.scratch import scratch_dir
from services.client import NoAnswer, Refused, ServiceClient
from services.processes import HOST, ChildError, free_port, start

START_TIMEOUT_S = 600.0  # loading a 1.5B GGUF takes seconds; a busy 2-core machine can take minutes
REQUEST_TIMEOUT_S = 24 * 3600.0  # in effect none: the watchdog, not a timeout, ends a request on a stopped server


def gguf_path(spec: str) -> Path:
    """The GGUF file of a model spec (embedded name, .gguf path, or a folder holding one GGUF)."""
    from models.resolve import ModelNotAvailable, resolve_model

    src = resolve_model(spec)
    if src.gguf_file:
        return src.path / src.gguf_file
    found = sorted(src.path.glob("*.gguf"))
    if len(found) != 1:
        raise ModelNotAvailable(f"the llamacpp backend needs a GGUF file; {spec!r} resolves to {src.path}, "
                                f"which holds {len(found)} .gguf files")
    return found[0]


def server_counters(metrics: str) -> dict[str, float]:
    """The unlabelled ``llamacpp:`` counters of a server's Prometheus ``/metrics`` text, by name without
    the prefix (``prompt_tokens_total``, ``tokens_predicted_seconds_total``, ...)."""
    counters = {}
    for line in metrics.splitlines():
        if line.startswith("llamacpp:") and "{" not in line:
            name, value = line.split()
            counters[name.removeprefix("llamacpp:")] = float(value)
    return counters


def request_label(request: Request, index: int, sample: int) -> str:
    """How messages name sample ``sample`` of the batch's request ``index``."""
    return f"'{request.label or f'#{index} of the batch'}' sample {sample}"


def default_threads() -> int:
    """Threads of a server whose config says 0: every core this process may use.

    On cores shared with other work, fewer threads are faster: llama.cpp's threads meet at a spinning barrier
    after every operation, so a preempted thread stalls the others (README, Reliability: on 2 shared cores 2
    threads took 3-10x as long per request as 1). Such machines set ``threads`` (e.g. 1); the default keeps
    what an idle machine runs fastest with, which the engine benchmarks measured.
    """
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LlamaCppGenerator:
    """``Generator`` over a llama.cpp server that this object starts and stops."""

    def __init__(self, cfg: BackendConfig):
        self.cfg = cfg
        self._model = gguf_path(cfg.model)
        self._lora = None
        if cfg.adapter:
            from agent_runtime.backends.lora_gguf import gguf_adapter_for

            self._lora = gguf_adapter_for(Path(cfg.adapter), self._model)
        self.name = f"llamacpp:{cfg.model}" + (f"+{Path(cfg.adapter).name}" if cfg.adapter else "")
        # The server's log and slot files in one folder of the run's scratch, which is removed with the
        # run even if this process is killed.
        self._scratch = Path(tempfile.mkdtemp(prefix="llamacpp-", dir=scratch_dir()))
        (self._scratch / "slots").mkdir()
        self._restart_lock = threading.Lock()
        self._client: OpenAIGenerator | None = None
        self.watchdog: Watchdog | None = None
        self._start_server()

    def _start_server(self) -> None:
        """Start a server on a free port and wait until it answers; its clients and watchdog with it."""
        cfg = self.cfg
        self._shared: set[str] = set()  # system messages already in every slot
        port = free_port()
        cmd = [sys.executable, "-m", "agent_runtime.backends.llamacpp_server", "--model", str(self._model),
               "--alias", cfg.model, "--port", str(port), "--slots", str(cfg.slots),
               "--ctx-per-slot", str(cfg.ctx_per_slot), "--threads", str(cfg.threads or default_threads()),
               "--cache-ram-mib", str(cfg.cache_ram_mib), "--slot-save-path", str(self._scratch / "slots"),
               "--quiet"]
        if self._lora is not None:
            cmd += ["--lora", str(self._lora)]
        # Its log is read back for errors.
        self.server = start(cmd, name="the llama.cpp server", log=self._scratch / "server.log")
        self.base_url = f"http://{HOST}:{port}"
        # No read timeout: a request (also the shared prefix's) may take as long as the server makes
        # progress; the watchdog ends it when the server stops. A timeout re-sent slow requests, each
        # starting over (issue 31).
        self.api = ServiceClient(self.base_url, timeout_s=REQUEST_TIMEOUT_S, retries=cfg.max_retries)
        try:
            self.server.wait_until(lambda: self.api.answers("/health"), START_TIMEOUT_S,
                                   what=f"answer {self.base_url}/health")
        except ChildError as exc:
            self.close()
            raise GenerationError(f"{self.name}: {exc}") from None
        client_cfg = cfg.model_copy(update={"base_url": f"{self.base_url}/v1", "concurrency": cfg.slots,
                                            "timeout_s": REQUEST_TIMEOUT_S})
        self._client = OpenAIGenerator(client_cfg, continue_mode="prefill")
        self.watchdog = Watchdog(self.server, self.base_url, f"llama.cpp server pid {self.server.pid} "
                                 f"({HOST}:{port}, model {cfg.model})", cfg.stall_timeout_s)

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Generation]:
        with self._restart_lock:
            if self.watchdog.stall is not None:  # the watchdog killed the last server: start a new one
                self._stop_server()
                self._start_server()
            watchdog = self.watchdog
        self._check_alive()
        in_flight = {sample_seed(request, sampling, j): request_label(request, i, j)
                     for i, request in enumerate(requests) for j in range(sampling.n)}
        try:
            with watchdog.watch(in_flight):
                self.share_prefix(requests)
                return self._client.generate(requests, sampling)
        except GenerationError as exc:
            if watchdog.stall is not None:
                raise ServerStalled(f"{self.name}: {watchdog.stall}") from None
            self._check_alive(exc)
            raise

    def score(self, requests: list[Request], completions: list[str]) -> list[Scored]:
        """Not possible: llama.cpp's server returns log-probs of the tokens it samples, never of given ones."""
        raise GenerationError(
            f"{self.name}: llama.cpp's server cannot score given tokens (it reports log-probs only of the "
            "tokens it samples); score with the transformers or vllm backend"
        )

    def share_prefix(self, requests: list[Request]) -> bool:
        """Put the batch's common system message into every slot's cache (see the module docstring);
        True when it did so now. Nothing to do for one slot, one request, or no common system message."""
        first = requests[0].messages[0] if requests and requests[0].messages else None
        if (self.cfg.slots < 2 or len(requests) < 2 or first is None or first["role"] != "system"
                or any(not r.messages or r.messages[0] != first for r in requests)):
            return False
        key = hashlib.sha256(first["content"].encode()).hexdigest()[:16]
        if key in self._shared:
            return False
        try:
            self.api.post("/v1/chat/completions", {"model": self.cfg.model, "messages": [first], "max_tokens": 1,
                                                   "temperature": 0.0, "id_slot": 0, "cache_prompt": True})
            saved = self.slot_action(0, "save", f"{key}.bin")
            for slot in range(1, self.cfg.slots) if saved else ():
                self.slot_action(slot, "restore", f"{key}.bin")
        except NoAnswer as exc:
            raise EndpointUnavailable(f"{self.name}: the server did not answer while sharing a prefix ({exc})") from None
        except Refused as exc:
            raise GenerationError(f"{self.name}: {exc}") from None
        self._shared.add(key)  # also when the server refused: the batch then runs as before
        return saved

    def slot_action(self, slot: int, action: str, filename: str) -> bool:
        """``POST /slots/<slot>?action=save|restore`` of ``filename`` (in the server's slot folder); False
        when the server refuses (a slot without a cache to save, a server without slot files)."""
        try:
            self.api.post(f"/slots/{slot}?action={action}", {"filename": filename})
        except Refused:
            return False
        return True

    def prompt_tokens_processed(self) -> int | None:
        """Prompt tokens the server evaluated so far (cache misses), from its Prometheus counter; None
        when the server does not answer."""
        try:
            text = self.api.get_text("/metrics")
        except (NoAnswer, Refused):
            return None
        processed = server_counters(text).get("prompt_tokens_total")
        return None if processed is None else int(processed)

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s) and close the clients."""
        self._stop_server()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def _stop_server(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()
        # The server first: requests still waiting on a stalled one end when it is gone.
        self.server.stop(timeout_s=10)
        if self._client is not None:
            self._client.close()
        self.api.close()
        self._client = self.watchdog = None

    def _check_alive(self, cause: Exception | None = None) -> None:
        ended = self.server.ended()
        if ended is not None:
            raise GenerationError(f"{self.name}: {ended}") from cause
