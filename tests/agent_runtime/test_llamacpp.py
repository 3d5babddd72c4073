"""The ``llamacpp`` backend (xllamacpp's llama.cpp server in a child process) and PEFT → GGUF LoRA conversion.

Real-server tests use the embedded SmolLM2 GGUF (a llama-architecture model, so the q/k row permutation
of the conversion is exercised) and assert what llama.cpp guarantees on every CPU: token counts, stop
strings, prefix continuation, n distinct samples; never bit-exact sampled text, since a slot's prompt
cache and the CPU's kernels change the logits slightly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time

import numpy as np
import pytest

from agent_runtime.backends import BackendConfig, make_generator
from agent_runtime.backends.llamacpp_backend import gguf_path, server_counters
from agent_runtime.backends.llamacpp_watchdog import ServerStalled
from agent_runtime.backends.lora_gguf import AdapterError, convert, permute_rows
from agent_runtime.generation import GenerationError, Request, Sampling
from common.scratch import scratch_dir

MODEL = "smollm2-135m-instruct"


def chat(question: str, seed: int | None = None) -> Request:
    return Request([{"role": "user", "content": question}], seed=seed)


# --- conversion, no server -------------------------------------------------------------------------


def write_peft_adapter(folder, tensors: dict[str, np.ndarray], r: int = 2, alpha: float = 4.0, **extra) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "k_proj"], **extra}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def smollm2_pair(module: str, out_rows: int, in_cols: int, r: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    key = f"base_model.model.model.layers.0.self_attn.{module}"
    return {f"{key}.lora_A.weight": rng.standard_normal((r, in_cols), dtype=np.float32),
            f"{key}.lora_B.weight": rng.standard_normal((out_rows, r), dtype=np.float32)}


def test_server_counters_reads_the_unlabelled_llamacpp_counters():
    metrics = ("# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.\n"
               "# TYPE llamacpp:prompt_tokens_total counter\n"
               "llamacpp:prompt_tokens_total 1765\n"
               "llamacpp:tokens_predicted_seconds_total 105.358\n"
               'llamacpp:spec_decode_num_accepted_tokens_per_pos_total{position="0"} 106\n'
               "process_cpu_seconds_total 12\n")
    assert server_counters(metrics) == {"prompt_tokens_total": 1765.0, "tokens_predicted_seconds_total": 105.358}


def test_permute_rows_interleaves_the_rotary_halves_of_each_head():
    rows = np.arange(8, dtype=np.float32)[:, None]  # 2 heads x 4 rows: [0 1 2 3 | 4 5 6 7]
    assert permute_rows(rows, n_head=2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_conversion_renames_permutes_and_records_alpha(tmp_path):
    from gguf import GGUFReader

    base = gguf_path(MODEL)  # SmolLM2: hidden 576, 9 heads, 3 kv heads of 64 → k_proj has 192 rows
    tensors = {**smollm2_pair("q_proj", 576, 576), **smollm2_pair("k_proj", 192, 576, seed=1)}
    write_peft_adapter(tmp_path / "adapter", tensors, r=2, alpha=4.0)
    out = convert(tmp_path / "adapter", base, tmp_path / "adapter.gguf")

    reader = GGUFReader(out)
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    assert reader.get_field("adapter.lora.alpha").contents() == pytest.approx(4.0)
    written = {t.name: np.asarray(t.data).reshape(tuple(int(d) for d in reversed(t.shape))) for t in reader.tensors}
    assert sorted(written) == ["blk.0.attn_k.weight.lora_a", "blk.0.attn_k.weight.lora_b",
                               "blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b"]
    q_a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    q_b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    k_b = tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    np.testing.assert_array_equal(written["blk.0.attn_q.weight.lora_a"], q_a)  # A is never permuted
    np.testing.assert_array_equal(written["blk.0.attn_q.weight.lora_b"], permute_rows(q_b, 9))
    np.testing.assert_array_equal(written["blk.0.attn_k.weight.lora_b"], permute_rows(k_b, 3))
    assert not np.array_equal(written["blk.0.attn_q.weight.lora_b"], q_b)


def test_rank_stabilised_lora_keeps_its_scale(tmp_path):
    from gguf import GGUFReader

    write_peft_adapter(tmp_path / "a", smollm2_pair("q_proj", 576, 576, r=4), r=4, alpha=8.0, use_rslora=True)
    out = convert(tmp_path / "a", gguf_path(MODEL), tmp_path / "a.gguf")
    # llama.cpp scales by alpha / r; rsLoRA by alpha / sqrt(r) = 8 / 2 → the file holds 4 * 4 = 16.
    assert GGUFReader(out).get_field("adapter.lora.alpha").contents() == pytest.approx(16.0)


@pytest.mark.parametrize("damage, message", [
    ("no_config", "adapter_config.json is missing"),
    ("bad_config", "not a LoRA adapter config"),
    ("bad_weights", "not a readable safetensors file"),
    ("wrong_shape", "needs (2, 576)"),
    ("unknown_module", "has no tensor in"),
])
def test_a_broken_adapter_folder_is_one_clear_error(tmp_path, damage, message):
    folder = tmp_path / "adapter"
    tensors = smollm2_pair("q_proj", 576, 576)
    if damage == "wrong_shape":
        tensors = smollm2_pair("q_proj", 576, 100)
    if damage == "unknown_module":
        tensors = {k.replace("self_attn.q_proj", "self_attn.nonsense"): v for k, v in tensors.items()}
    write_peft_adapter(folder, tensors)
    if damage == "no_config":
        (folder / "adapter_config.json").unlink()
    if damage == "bad_config":
        (folder / "adapter_config.json").write_text("{\"r\": ")
    if damage == "bad_weights":
        (folder / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        convert(folder, gguf_path(MODEL), tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


# --- the real server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    generator = make_generator(BackendConfig(kind="llamacpp", model=MODEL, slots=2, ctx_per_slot=1024))
    yield generator
    generator.close()


@pytest.mark.slow
def test_samples_differ_and_report_token_counts(llama):
    sampling = Sampling(n=2, temperature=0.9, max_new_tokens=16, seed=4)
    [generation] = llama.generate([chat("Write one sentence about rivers.", seed=10)], sampling)
    first, second = generation.completions
    assert first.text and second.text and first.text != second.text
    assert first.prompt_tokens == second.prompt_tokens > 10
    assert all(0 < c.completion_tokens <= 16 for c in generation.completions)


@pytest.mark.slow
def test_stop_strings_are_cut(llama):
    [generation] = llama.generate([chat("Describe the weather in three sentences.")],
                                  Sampling(max_new_tokens=40, stop=("e", "a")))
    [completion] = generation.completions
    assert completion.finish_reason == "stop"
    assert "e" not in completion.text and "a" not in completion.text and completion.completion_tokens < 10


@pytest.mark.slow
def test_an_assistant_prefix_is_continued_not_repeated(llama):
    prefix = "The capital of France is"
    request = Request([{"role": "user", "content": "What is the capital of France?"},
                       {"role": "assistant", "content": prefix}], continue_final=True)
    [generation] = llama.generate([request], Sampling(max_new_tokens=8))
    [completion] = generation.completions
    assert "Paris" in completion.text and prefix not in completion.text


@pytest.mark.slow
def test_the_openai_backend_recognises_a_llamacpp_server(llama):
    client = make_generator(BackendConfig(kind="openai", model=MODEL, base_url=f"{llama.base_url}/v1"))
    try:
        prefix = "The capital of France is"
        request = Request([{"role": "user", "content": "What is the capital of France?"},
                           {"role": "assistant", "content": prefix}], continue_final=True)
        [generation] = client.generate([request], Sampling(max_new_tokens=8))
        assert client._continue_mode == "prefill"
        assert prefix not in generation.completions[0].text
    finally:
        client.close()


@pytest.mark.slow
def test_a_shared_system_message_is_processed_once_for_all_slots(llama):
    system = {"role": "system", "content": "You answer questions about rivers. " + " ".join(
        f"Fact {i}: river number {i} flows into sea number {i % 7}." for i in range(40))}
    requests = [Request([system, {"role": "user", "content": f"Where does river {i} flow?"}]) for i in (3, 11)]
    before = llama.prompt_tokens_processed()
    generations = llama.generate(requests, Sampling(max_new_tokens=4))
    processed = llama.prompt_tokens_processed() - before
    full = generations[0].completions[0].prompt_tokens
    assert full > 300
    # Without sharing each of the 2 slots processes the whole prompt (~2 x full); shared, the system
    # message is processed once (slot 0), then only each question.
    assert processed < 1.3 * full, (processed, full)
    assert llama.share_prefix(requests) is False  # already in every slot
    # The saved slot is inside the server's folder of the run's scratch (before: beside the slot folder,
    # 29 MB in $TMPDIR that no run removed).
    folder = llama.server.log.parent
    assert sorted(p.name for p in folder.iterdir()) == ["server.log", "slots"]
    assert [p.suffix for p in (folder / "slots").iterdir()] == [".bin"]
    assert folder.parent == scratch_dir()


@pytest.mark.slow
def test_a_killed_server_is_one_error_naming_the_backend():
    generator = make_generator(BackendConfig(kind="llamacpp", model=MODEL, slots=1, ctx_per_slot=512,
                                             max_retries=1))
    try:
        os.kill(generator.server.pid, signal.SIGKILL)
        generator.server.process.wait(timeout=10)
        with pytest.raises(GenerationError, match=r"llamacpp:smollm2-135m-instruct: the llama.cpp server "
                                                  r"\(pid \d+\) was killed by signal 9"):
            generator.generate([chat("Hello")], Sampling(max_new_tokens=4))
    finally:
        generator.close()


@pytest.mark.slow
def test_a_stopped_server_is_one_error_naming_it_its_slot_and_the_request_and_the_next_call_restarts_it():
    """SIGSTOP the server while a slot decodes: instead of waiting on it, the call fails within the stall
    timeout (plus generous slack for a loaded machine) with one ServerStalled naming pid, slot, request."""
    stall_timeout_s = 3.0
    generator = make_generator(BackendConfig(kind="llamacpp", model=MODEL, slots=2, ctx_per_slot=1024,
                                             max_retries=1, stall_timeout_s=stall_timeout_s))
    pid = generator.server.pid
    request = Request([{"role": "user", "content": "Count from 1 to 2000, one number per line."}],
                      label="question q7 sample 0 step 1")
    outcome = {}

    def call():
        try:
            generator.generate([request], Sampling(max_new_tokens=900))
        except GenerationError as exc:
            outcome["error"] = exc
        outcome["at"] = time.monotonic()

    caller = threading.Thread(target=call)
    try:
        caller.start()
        deadline = time.monotonic() + 120
        while not any(slot.processing for slot in generator.watchdog.last_slots or ()):  # the watchdog saw it
            assert caller.is_alive() and time.monotonic() < deadline, outcome
            time.sleep(0.05)
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        caller.join(timeout=stall_timeout_s + 120)
        assert isinstance(outcome.get("error"), ServerStalled), outcome
        assert outcome["at"] - stopped_at < stall_timeout_s + 30
        message = str(outcome["error"])
        assert f"llama.cpp server pid {pid} (127.0.0.1:" in message and "model smollm2-135m-instruct)" in message
        assert "made no progress for" in message and "process stopped (state T)" in message
        assert re.search(r"slot \d on request 'question q7 sample 0 step 1' sample 0", message), message
        [generation] = generator.generate([chat("Say hello.")], Sampling(max_new_tokens=4))  # a new server
        assert generator.server.pid != pid and generation.completions[0].completion_tokens > 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        caller.join(timeout=60)
        generator.close()


@pytest.mark.slow
def test_a_converted_adapter_on_llamacpp_matches_transformers_with_peft(tmp_path):
    """First-token log-probs of base+adapter: llama.cpp (quantised GGUF weights, converted adapter) vs
    transformers + PEFT (the de-quantised weights): the same top token and log-probs within 0.3 nats,
    while the adapter moves them by more than 1 nat, so the check sees the adapter."""
    import httpx
    import torch
    from peft import LoraConfig, get_peft_model

    from agent_runtime.backends.transformers_backend import load_model
    from models.resolve import resolve_model

    torch.manual_seed(0)
    model, tokenizer = load_model(resolve_model(MODEL), torch.device("cpu"), torch.float32, None)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "adapter")
    prompts = ["The capital of France is", "def fibonacci(n):", "Question: what is 12*12?\nAnswer:"]

    def transformers_top(enabled: bool) -> list[tuple[str, float]]:
        tops = []
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                if enabled:
                    logits = peft_model(ids).logits
                else:
                    with peft_model.disable_adapter():
                        logits = peft_model(ids).logits
            logprobs = torch.log_softmax(logits[0, -1].float(), -1)
            tops.append((tokenizer.decode([int(logprobs.argmax())]), float(logprobs.max())))
        return tops

    def llamacpp_top(adapter) -> list[tuple[str, float]]:
        generator = make_generator(BackendConfig(kind="llamacpp", model=MODEL, adapter=adapter, slots=1,
                                                 ctx_per_slot=512))
        try:
            tops = []
            for prompt in prompts:
                answer = httpx.post(f"{generator.base_url}/completion", timeout=120, json={
                    "prompt": prompt, "n_predict": 1, "n_probs": 1, "temperature": 0}).json()
                best = answer["completion_probabilities"][0]["top_logprobs"][0]
                tops.append((best["token"], best["logprob"]))
            return tops
        finally:
            generator.close()

    adapted_hf, base_hf = transformers_top(True), transformers_top(False)
    adapted_ll = llamacpp_top(str(tmp_path / "adapter"))
    assert [token for token, _ in adapted_ll] == [token for token, _ in adapted_hf]
    assert max(abs(a - b) for (_, a), (_, b) in zip(adapted_ll, adapted_hf)) < 0.3
    moved = [abs(a - b) if ta == tb else float("inf") for (ta, a), (tb, b) in zip(adapted_hf, base_hf)]
    assert max(moved) > 1.0
