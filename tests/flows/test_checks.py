"""The checks a stage runs on its inputs before it starts accept real files and name broken ones."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from flows.checks import check_corpus
from models.files import check_adapter, check_gguf, check_safetensors
from models.resolve import ModelNotAvailable, resolve_model
from retrieval.corpus import CorpusConfig, CorpusError


@pytest.fixture
def adapter(tmp_path):
    """A folder shaped like PEFT's save_pretrained output."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    save_file({"a": np.zeros((8, 64), np.float32), "b": np.ones((64, 8), np.float32)},
              str(folder / "adapter_model.safetensors"))
    return folder


def test_a_whole_adapter_passes_and_a_truncated_one_is_named(adapter):
    check_adapter(adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelNotAvailable, match=f"{weights}: truncated or padded safetensors file"):
        check_adapter(adapter)


def test_a_safetensors_header_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes((6).to_bytes(8, "little") + b"{nope}")
    with pytest.raises(ModelNotAvailable, match="corrupt safetensors header"):
        check_safetensors(path)


def test_the_shipped_gguf_passes_and_its_truncation_is_named(tmp_path):
    shipped = resolve_model("smollm2-135m-instruct")
    check_gguf(shipped.path / shipped.gguf_file)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((shipped.path / shipped.gguf_file).read_bytes()[:1_000_000])
    with pytest.raises(ModelNotAvailable, match=f"{cut}: truncated or corrupt GGUF file"):
        check_gguf(cut)


def test_the_corpus_check_reads_only_the_head(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    good = [json.dumps({"id": str(i), "title": "T", "text": f"text {i}"}) for i in range(1001)]
    corpus.write_text("\n".join([*good, "not json"]) + "\n")
    check_corpus(CorpusConfig(source=str(corpus)))  # line 1002 is past the first 1000 documents
    corpus.write_text("\n".join([*good[:3], "not json"]) + "\n")
    with pytest.raises(CorpusError, match=f"{corpus}:4: malformed JSON"):
        check_corpus(CorpusConfig(source=str(corpus)))
