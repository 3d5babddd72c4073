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
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from agent_runtime.backends import BackendConfig
from agent_runtime.backends.openai_backend import OpenAIGenerator
from agent_runtime.generation import (
    EndpointUnavailable,
    Generation,
    GenerationError,
    Request,
    Sampling,
    Scored,
)
from common.scratch import scratch_dir
from services.client import NoAnswer, Refused, ServiceClient
from services.processes import HOST, ChildError, free_port, start

START_TIMEOUT_S = 600.0  # loading a 1.5B GGUF takes seconds; a busy 2-core machine can take minutes


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


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LlamaCppGenerator:
    """``Generator`` over a llama.cpp server that this object starts and stops."""

    def __init__(self, cfg: BackendConfig):
        self.cfg = cfg
        model = gguf_path(cfg.model)
        lora = None
        if cfg.adapter:
            from agent_runtime.backends.lora_gguf import gguf_adapter_for

            lora = gguf_adapter_for(Path(cfg.adapter), model)
        self.name = f"llamacpp:{cfg.model}" + (f"+{Path(cfg.adapter).name}" if cfg.adapter else "")
        # The server's log and slot files in one folder of the run's scratch, which is removed with the
        # run even if this process is killed.
        self._scratch = Path(tempfile.mkdtemp(prefix="llamacpp-", dir=scratch_dir()))
        log_path = self._scratch / "server.log"
        slot_dir = self._scratch / "slots"
        slot_dir.mkdir()
        self._shared: set[str] = set()  # system messages already in every slot
        self._client: OpenAIGenerator | None = None
        port = free_port()
        cmd = [sys.executable, "-m", "agent_runtime.backends.llamacpp_server", "--model", str(model),
               "--alias", cfg.model, "--port", str(port), "--slots", str(cfg.slots),
               "--ctx-per-slot", str(cfg.ctx_per_slot), "--threads", str(cfg.threads or cpu_threads()),
               "--cache-ram-mib", str(cfg.cache_ram_mib), "--slot-save-path", str(slot_dir), "--quiet"]
        if lora is not None:
            cmd += ["--lora", str(lora)]
        self.server = start(cmd, name="the llama.cpp server", log=log_path)  # its log: read back for errors
        self.base_url = f"http://{HOST}:{port}"
        self.api = ServiceClient(self.base_url, timeout_s=cfg.timeout_s, retries=cfg.max_retries)
        try:
            self.server.wait_until(lambda: self.api.answers("/health"), START_TIMEOUT_S,
                                   what=f"answer {self.base_url}/health")
        except ChildError as exc:
            self.close()
            raise GenerationError(f"{self.name}: {exc}") from None
        client_cfg = cfg.model_copy(update={"base_url": f"{self.base_url}/v1", "concurrency": cfg.slots})
        self._client = OpenAIGenerator(client_cfg, continue_mode="prefill")

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Generation]:
        self._check_alive()
        try:
            self.share_prefix(requests)
            return self._client.generate(requests, sampling)
        except GenerationError as exc:
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
        if self._client is not None:
            self._client.close()
        self.api.close()
        self.server.stop(timeout_s=10)
        shutil.rmtree(self._scratch, ignore_errors=True)

    def _check_alive(self, cause: Exception | None = None) -> None:
        status = self.server.exit_status()
        if status is None:
            return
        tail = self.server.tail(5)
        log = ("; its last log lines: " + " | ".join(tail)) if tail else ""
        raise GenerationError(f"{self.name}: the llama.cpp server (pid {self.server.pid}) {status}{log}") from cause
