"""GGUF headers read without gguf's reader: every value kind, the tensor table, and bad files."""

from __future__ import annotations

import pytest

from models.gguf_header import ARRAY_VALUE, header_value, read_header
from models.split_gguf import gguf_general_name


def test_a_header_value_is_read_past_arrays_and_scalars_of_every_kind(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "kinds.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"] * 1000)  # before the keys asked for
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.25])
    writer.add_uint32("llama.context_length", 4096)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_uint64("general.size", 2**40)
    writer.add_name("After The Arrays")
    writer.add_tensor("w", np.zeros((2, 2), dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    value = header_value
    assert value(path, "general.name") == gguf_general_name(path) == "After The Arrays"
    assert value(path, "general.architecture") == "llama"
    assert (value(path, "llama.context_length"), value(path, "llama.rope.freq_base")) == (4096, 10000.0)
    assert (value(path, "tokenizer.ggml.add_bos_token"), value(path, "general.size")) == (True, 2**40)
    assert value(path, "no.such.key") is None
    with pytest.raises(ValueError, match="is a GGUF array, not a string or number"):
        value(path, "tokenizer.ggml.tokens")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:200])  # ends inside the token array
    assert gguf_general_name(truncated) is None
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    assert gguf_general_name(not_gguf) is None


def test_the_header_of_the_embedded_gguf_is_what_ggufs_reader_reads():
    from gguf import GGUFReader

    from models.resolve import resolve_model

    src = resolve_model("smollm2-135m-instruct")
    path = src.path / src.gguf_file
    header, reader = read_header(path), GGUFReader(path)
    fields = {name: field for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert set(header.values) == set(fields)
    for name, field in fields.items():
        expected = ARRAY_VALUE if field.types[0].name == "ARRAY" else field.contents()
        assert header.values[name] == expected, name
    assert header.tensors == {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    assert header.values["general.architecture"] == "llama" and header.tensors["token_embd.weight"] == (49152, 576)
