"""``kind: auto``: the engine measured fastest for the model on this CPU kind, llama.cpp where unmeasured,
vLLM on a GPU; resolved before a stage loads the model."""

import pytest

from agent_runtime.backends import BackendConfig
from agent_runtime.backends.engines import choose_engine, resolve_engine
from devices.precision import cpu_kind

QWEN_15B = "qwen2.5-coder-1.5b-instruct"


@pytest.mark.parametrize(("model", "kind", "gpu", "vllm", "engine"), [
    (QWEN_15B, "amx", False, True, "transformers"),
    (QWEN_15B, "avx512-bf16", False, False, "transformers"),
    (QWEN_15B, "avx2", False, True, "llamacpp"),
    (QWEN_15B, "avx512", False, True, "llamacpp"),  # not measured there
    ("smollm2-135m-instruct", "amx", False, True, "llamacpp"),  # not measured
    (QWEN_15B, "avx2", True, True, "vllm"),
    (QWEN_15B, "avx2", True, False, "transformers"),
])
def test_the_choice_follows_the_measurements(model, kind, gpu, vllm, engine):
    chosen, why = choose_engine(model, kind, gpu, vllm)
    assert chosen == engine and why


@pytest.mark.parametrize(("flags", "kind"), [
    ("fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "amx"),
    ("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni", "avx512-bf16"),
    ("fpu sse2 avx2 avx512f avx512bw", "avx512"),
    ("fpu sse2 avx avx2 fma", "avx2"),
    ("fpu sse2", "other"),
])
def test_the_cpu_kind_is_read_from_the_flags(tmp_path, flags, kind):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_kind(str(cpuinfo)) == kind
    assert cpu_kind(str(tmp_path / "missing")) == "other"


def test_auto_is_resolved_before_a_stage_loads_the_model(monkeypatch):
    from agent_runtime.backends import engines
    from tasks import resources

    monkeypatch.setattr(engines, "this_machine", lambda: ("avx512-bf16", False, False))
    loaded = []

    class Loaded:
        def close(self):
            pass

    monkeypatch.setattr(resources, "load_generator", lambda cfg, adapters: loaded.append(cfg) or Loaded())
    auto = BackendConfig(kind="auto", model=QWEN_15B, adapter=None)
    assert resolve_engine(auto) == auto.model_copy(update={"kind": "transformers"})
    assert resolve_engine(BackendConfig(kind="llamacpp", model=QWEN_15B)).kind == "llamacpp"  # others stay
    generators = resources.Generators()
    with generators.lease(auto):
        pass
    assert [cfg.kind for cfg in loaded] == ["transformers"]
