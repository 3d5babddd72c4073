"""The one precision policy: what ``auto`` means on each device, with the CPU's bf16 probe patched both ways.

Each user of the policy is checked under both answers of the probe: the transformers backend (the torch
dtype it loads a model in), the embedder (its autocast dtype) and LoRA training (the Accelerator's mixed
precision), so that the result does not depend on the CPU the tests run on.
"""

import pytest
import torch

from agent_runtime.backends.transformers_backend import torch_dtype as backend_dtype
from devices.precision import cpu_has_native_bf16, resolve_dtype
from retrieval.embed import resolve_precision
from training.sft import TrainConfig, make_accelerator


@pytest.fixture
def probe(monkeypatch):
    """Sets what torch's CPU bf16 probe answers; counts its calls. The cached verdict is cleared around it."""
    calls = []

    def set_answer(answer):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: calls.append(answer) or answer)
        cpu_has_native_bf16.cache_clear()
        return calls

    yield set_answer
    cpu_has_native_bf16.cache_clear()  # before monkeypatch restores the real probe: the next call asks it


@pytest.mark.parametrize(("answer", "expected"), [(True, True), (False, False), (1, True), (0, False)])
def test_the_probe_is_a_bool_asked_once(probe, answer, expected):
    calls = probe(answer)
    assert cpu_has_native_bf16() is expected
    assert cpu_has_native_bf16() is expected
    assert calls == [answer]  # cached: the second call does not ask torch again


@pytest.mark.parametrize(("native", "cpu_dtype", "cpu_torch_dtype", "cpu_mixed_precision"), [
    (True, "bfloat16", torch.bfloat16, "bf16"),
    (False, "float32", torch.float32, "no"),
])
def test_auto_on_the_cpu_follows_the_probe_for_every_user(probe, monkeypatch, native, cpu_dtype, cpu_torch_dtype,
                                                          cpu_mixed_precision):
    probe(native)
    assert resolve_dtype("auto", "cpu") == cpu_dtype
    assert backend_dtype("auto", torch.device("cpu")) == cpu_torch_dtype
    assert resolve_precision("auto", "cpu") == cpu_dtype

    made = []
    monkeypatch.setattr("accelerate.Accelerator", lambda **kwargs: made.append(kwargs) or kwargs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    make_accelerator(TrainConfig(grad_accum=3))
    assert made == [{"gradient_accumulation_steps": 3, "mixed_precision": cpu_mixed_precision, "cpu": True}]


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_a_gpu_ignores_the_cpu_probe(probe, monkeypatch, native):
    calls = probe(native)
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    assert resolve_dtype("auto", "cuda:1", gpu="float16") == "float16"
    assert backend_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_precision("auto", "cuda") == "float16"  # the embedder's GPU choice

    made = []
    monkeypatch.setattr("accelerate.Accelerator", lambda **kwargs: made.append(kwargs) or kwargs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    make_accelerator(TrainConfig(grad_accum=1))
    assert made == [{"gradient_accumulation_steps": 1, "mixed_precision": "bf16", "cpu": False}]
    assert calls == []  # the CPU was never asked


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize(("dtype", "torch_dtype"), [
    ("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16),
])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_explicit_dtype_is_itself_everywhere(probe, native, dtype, torch_dtype, device):
    calls = probe(native)
    assert resolve_dtype(dtype, device) == dtype
    assert resolve_dtype(dtype, device, gpu="float16") == dtype
    assert backend_dtype(dtype, torch.device(device)) == torch_dtype
    assert resolve_precision(dtype, device) == dtype
    assert calls == []


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize(("precision", "mixed_precision", "autocast_enabled"), [
    ("float32", "no", False), ("bfloat16", "bf16", True),
])
def test_the_training_precision_setting_overrides_the_probe(probe, monkeypatch, native, precision, mixed_precision,
                                                            autocast_enabled):
    """train.precision: the study's float32 students on a CPU with native bf16 (and bf16 asked on one without);
    the OPD update follows the same setting."""
    from training.opd import autocast

    probe(native)
    made = []
    monkeypatch.setattr("accelerate.Accelerator", lambda **kwargs: made.append(kwargs) or kwargs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    make_accelerator(TrainConfig(grad_accum=2, precision=precision))
    assert made == [{"gradient_accumulation_steps": 2, "mixed_precision": mixed_precision, "cpu": True}]
    with autocast(torch.device("cpu"), precision):
        assert torch.is_autocast_enabled("cpu") is autocast_enabled
    with autocast(torch.device("cpu")):  # auto follows the probe
        assert torch.is_autocast_enabled("cpu") is native
