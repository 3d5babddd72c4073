"""Split GGUFs: assembly from wheel parts, verification, corruption detection and re-assembly.

A small real GGUF is cut into parts laid out like the wheels (``<package>N/data/partNN.bin``) on
``sys.path``; the embedded Qwen files themselves are checked by ``distillery models`` (slow).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from models import split_gguf
from models.split_gguf import SplitGguf


@pytest.fixture
def split_model(tmp_path, monkeypatch) -> SplitGguf:
    import gguf

    source = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(source, "llama")
    writer.add_name("Tiny Test Model")
    writer.add_tensor("token_embd.weight", __import__("numpy").arange(4096, dtype="float32").reshape(64, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = source.read_bytes()
    site = tmp_path / "site"
    third = len(data) // 3 + 1
    for n in range(1, 4):
        folder = site / f"tinypart_fixture{n}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"part{n:02d}.bin").write_bytes(data[(n - 1) * third:n * third])
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("DISTILLERY_MODEL_CACHE", str(tmp_path / "cache"))
    return SplitGguf(spec="tiny", title="tiny", package="tinypart-fixture", version="1", parts=3,
                     filename="tiny.gguf", size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                     general_name="Tiny Test Model")


def test_parts_are_assembled_verified_and_then_trusted(split_model):
    path, action = split_gguf.install(split_model)
    assert action == "assembled" and path == Path(split_gguf.model_cache()) / "tiny.gguf"
    assert split_gguf.sha256_of(path) == split_model.sha256
    assert split_gguf.ready_path(split_model) == path
    assert not list(path.parent.glob("*.partial-*"))  # no temporary file left
    assert split_gguf.install(split_model)[1] == "verified"


def test_one_changed_byte_is_detected_reported_and_reassembled(split_model):
    path, _ = split_gguf.install(split_model)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(split_gguf.ModelFileError, match=r"SHA-256 .* \(corrupted\); run `distillery models "
                                                         r"install tiny` to assemble it again"):
        split_gguf.ready_path(split_model)
    path2, action = split_gguf.install(split_model)
    assert action.startswith("re-assembled (") and "corrupted" in action
    assert split_gguf.sha256_of(path2) == split_model.sha256


def test_missing_parts_say_what_to_run(split_model, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not p.endswith("site")])
    with pytest.raises(split_gguf.ModelFileError, match=r"3 of its 3 wheel parts are not installed\); run "
                                                         r"`distillery models install tiny` \(or `make setup`\)"):
        split_gguf.ready_path(split_model)


def test_parts_that_do_not_give_the_pinned_file_leave_nothing_in_the_cache(split_model):
    wrong = SplitGguf(**{**split_model.__dict__, "sha256": "0" * 64})
    with pytest.raises(split_gguf.ModelFileError, match="do not give the pinned file"):
        split_gguf.install(wrong)
    assert not split_gguf.assembled_path(wrong).exists()
    assert not list(split_gguf.model_cache().glob("*.partial-*"))


def test_a_file_with_another_header_name_is_rejected(split_model):
    split_gguf.install(split_model)
    renamed = SplitGguf(**{**split_model.__dict__, "general_name": "Something Else"})
    assert "is GGUF 'Tiny Test Model', expected 'Something Else'" in split_gguf.verify(renamed)


@pytest.mark.slow
def test_distillery_models_lists_the_three_generative_models_verified():
    result = subprocess.run([sys.executable, "-m", "flows.cli", "models", "--format", "json"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    rows = {row["spec"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert rows["smollm2-135m-instruct"]["state"] == "installed", result.stdout
    for spec in ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"):
        assert rows[spec]["state"] == "verified (size, SHA-256, header)", result.stdout
        assert Path(rows[spec]["path"]).stat().st_size == split_gguf.SPLIT_GGUFS[spec].size
