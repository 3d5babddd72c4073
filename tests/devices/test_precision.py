"""The one precision policy: what ``auto`` means on each device, in one vocabulary."""

import torch

from devices.precision import cpu_has_native_bf16, resolve_dtype


def test_auto_is_bfloat16_on_gpus_and_native_cpus_and_explicit_values_stay():
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert cpu_has_native_bf16() == native
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
    assert resolve_dtype("auto", "cuda") == "bfloat16" and resolve_dtype("auto", "cuda:1", gpu="float16") == "float16"
    assert resolve_dtype("float32", "cuda") == "float32" and resolve_dtype("float16", "cpu") == "float16"
