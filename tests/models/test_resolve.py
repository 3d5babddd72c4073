"""Embedded models resolve to files shipped in PyPI packages and load without a hub."""

import pytest

from models.resolve import ModelNotAvailable, resolve_embedder, resolve_model


def test_embedded_specs_resolve_to_installed_files():
    lm = resolve_model("smollm2-135m-instruct")
    assert lm.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and (lm.path / lm.gguf_file).is_file()
    emb = resolve_embedder("minilm-l6-v2")
    assert (emb.path / "modules.json").is_file() and emb.gguf_file is None


def test_a_local_folder_resolves_to_itself(tmp_path):
    assert resolve_model(str(tmp_path)).path == tmp_path.resolve()


@pytest.mark.parametrize("spec, message", [
    ("no-such-model", "unknown model spec 'no-such-model'"),
    ("nobody/not-cached-model", "not in the local Hugging Face cache"),
])
def test_unknown_or_uncached_specs_say_how_to_provide_them(spec, message, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotAvailable, match=message):
        resolve_model(spec)


@pytest.mark.slow
def test_embedded_smollm2_loads_and_generates_for_a_chat_prompt():
    """Through the folder the backends and training load (``hf_folder``: the GGUF de-quantised once, cached);
    that it is the GGUF's model is tests/agent_runtime/test_backends.py::test_dequantized_cache_matches_the_gguf."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent_runtime.backends.transformers_backend import hf_folder

    folder = hf_folder(resolve_model("smollm2-135m-instruct"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.dtype == torch.float32 and tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert len(new_tokens) > 0 and any(ch.isalpha() for ch in text), text


def test_embedded_minilm_encodes_to_384_dimensions():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(resolve_embedder("minilm-l6-v2").path), device="cpu")
    vectors = model.encode(["a cat sat on the mat", "the capital of France"], normalize_embeddings=True)
    assert vectors.shape == (2, 384)
    assert abs(float((vectors[0] ** 2).sum()) - 1.0) < 1e-5
