"""Shared fixtures: every test gets its own artifact root and runs offline; a tiny random student.

Helpers that are not fixtures live in each package's ``<package>_fixtures.py`` (for example
``tests/training/training_fixtures.py``); no test module imports another test module.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
SHARED_DATA = ROOT.parent / "shared" / "data"
# Under pytest-xdist (`make test` runs the tests not marked slow on TEST_WORKERS workers) each worker process gets
# its own Prefect home: its own SQLite database and temporary server, inherited by the CLIs it starts.
if os.environ.get("PYTEST_XDIST_WORKER"):
    prefect_home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    os.environ["PREFECT_HOME"] = str(prefect_home / f"xdist-{os.environ['PYTEST_XDIST_WORKER']}")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "home"
    monkeypatch.setenv("DISTILLERY_HOME", str(root))
    return root


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect database and API for the whole session (Prefect's own test harness)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


@pytest.fixture(scope="session")
def smollm_tokenizer():
    """SmolLM2's tokenizer and chat template, read from the embedded GGUF (a few seconds, once per session)."""
    from training.sft import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, smollm_tokenizer) -> Path:
    """A folder with a tiny random LlamaForCausalLM and the SmolLM2 tokenizer (a valid base_model).

    2 layers, hidden size 64: a training step takes milliseconds on CPU. Used by the training tests and
    by the pipeline tests as the student.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-student")
    config = LlamaConfig(
        vocab_size=len(smollm_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=smollm_tokenizer.bos_token_id, eos_token_id=smollm_tokenizer.eos_token_id,
        pad_token_id=smollm_tokenizer.pad_token_id,
    )
    torch.manual_seed(1234)
    LlamaForCausalLM(config).save_pretrained(folder)
    smollm_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def small_home(tmp_path, monkeypatch):
    """A 256 KiB tmpfs as the home (mounted as root; skipped with the reason where that is not allowed);
    ``small_home.grow()`` gives it 8 MiB (space freed, nothing else touched)."""
    root = tmp_path / "small"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(root)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs home here: {mounted.stderr.strip() or mounted.returncode}")
    monkeypatch.setenv("DISTILLERY_HOME", str(root))
    try:
        yield SmallHome(root)
    finally:
        subprocess.run(["umount", str(root)], check=True)


class SmallHome:
    def __init__(self, path):
        self.path = path

    def grow(self, size: str = "8m"):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def fill(self):
        """Take every free byte (a file ``filler``), as another program would."""
        with (self.path / "filler").open("wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(b"\0" * 4096)
            except OSError:
                pass
