"""The LoRA SFT loop on a tiny random Llama with SmolLM2's tokenizer: weights, determinism, resume, artifact."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from training_fixtures import make_examples

from devices.precision import cpu_has_native_bf16
from storage.schemas import LOSSES
from training.checkpoints import MARKER, checkpoint_path, latest_checkpoint
from training.examples import TemplateError
from training.sft import (
    LoopState,
    NonFiniteLossError,
    TrainConfig,
    epoch_batches,
    make_accelerator,
    padding_waste,
    run_steps,
    run_stream,
    setup_run,
    train_lora,
    train_step,
)


def small_cfg(base: Path, **overrides) -> TrainConfig:
    """12 examples, batch 1 × 2 accumulation → 6 steps per epoch, 12 steps in 2 epochs."""
    values = {"base_model": str(base), "per_device_batch_size": 1, "grad_accum": 2, "epochs": 2,
              "max_length": 512, "checkpoint_every": 3, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}
    return TrainConfig(**{**values, **overrides})


def losses(out_dir: Path) -> list[float]:
    return [row["loss"] for row in pq.read_table(out_dir / "losses.parquet").to_pylist()]


def test_data_order_is_a_pure_function_of_seed_and_epoch():
    lengths = [5, 90, 12, 40, 33, 7, 61, 18, 25, 70, 3]
    first = epoch_batches(lengths, 2, seed=3, epoch=1, group_by_length=True)
    assert first == epoch_batches(lengths, 2, seed=3, epoch=1, group_by_length=True)
    assert first != epoch_batches(lengths, 2, seed=3, epoch=2, group_by_length=True)
    assert sorted(i for batch in first for i in batch) == list(range(len(lengths)))  # each example once


def test_run_stream_fills_whole_optimizer_steps():
    cfg = TrainConfig(per_device_batch_size=2, grad_accum=4, epochs=1.5)
    stream, per_epoch, steps = run_stream([10] * 20, cfg, num_processes=1)
    assert (per_epoch, steps) == (10, 4)  # ceil(15 micro-batches / 4)
    assert len(stream) == 16


def test_length_grouping_reduces_padding():
    lengths = [(i * 37) % 500 + 20 for i in range(256)]
    grouped = padding_waste(lengths, epoch_batches(lengths, 8, 0, 0, group_by_length=True))
    plain = padding_waste(lengths, epoch_batches(lengths, 8, 0, 0, group_by_length=False))
    assert grouped < plain / 3


def test_lora_weights_change_and_base_weights_do_not(tiny_student):
    cfg = small_cfg(tiny_student, max_steps=2)
    run = setup_run(cfg, make_examples(12), make_accelerator(cfg))
    before = {name: p.detach().clone() for name, p in run.model.named_parameters()}
    trainable = {name for name, p in run.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    for step in range(2):
        train_step(run, make_accelerator(cfg), step)
    after = dict(run.model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == trainable


def test_same_seed_gives_same_losses_and_another_seed_does_not(tiny_student, tmp_path):
    examples = make_examples(12)
    train_lora(small_cfg(tiny_student, max_steps=4), examples, tmp_path / "a")
    train_lora(small_cfg(tiny_student, max_steps=4), examples, tmp_path / "b")
    train_lora(small_cfg(tiny_student, max_steps=4, seed=1), examples, tmp_path / "c")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")


def test_resume_reproduces_the_straight_run_and_ignores_incomplete_checkpoints(tiny_student, tmp_path):
    examples = make_examples(12)
    straight = train_lora(small_cfg(tiny_student, max_steps=10), examples, tmp_path / "straight")
    reference = losses(tmp_path / "straight")
    assert straight["steps"] == 10 and len(reference) == 10

    first = train_lora(small_cfg(tiny_student, max_steps=5), examples, tmp_path / "split")
    assert first["steps"] == 5
    assert latest_checkpoint(tmp_path / "split" / "checkpoints") == checkpoint_path(tmp_path / "split" / "checkpoints", 5)
    # A copy of the run whose step-5 checkpoint lost its marker (killed while writing): resume from step 3.
    shutil.copytree(tmp_path / "split", tmp_path / "torn")
    (checkpoint_path(tmp_path / "torn" / "checkpoints", 5) / MARKER).unlink()

    resumed = train_lora(small_cfg(tiny_student, max_steps=10), examples, tmp_path / "split", resume=True)
    torn = train_lora(small_cfg(tiny_student, max_steps=10), examples, tmp_path / "torn", resume=True)
    assert resumed["steps"] == torn["steps"] == 10
    assert losses(tmp_path / "split") == pytest.approx(reference, abs=1e-6)
    assert losses(tmp_path / "torn") == pytest.approx(reference, abs=1e-6)
    assert torn["tokens"] == straight["tokens"]


def test_artifact_files_and_adapter_generates(tiny_student, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []
    metrics = train_lora(small_cfg(tiny_student, epochs=1), make_examples(12), tmp_path,
                         on_step=lambda step, total, loss: calls.append((step, total)))
    assert calls == [(step, 6) for step in range(1, 7)]
    assert {"steps", "tokens", "final_loss", "tokens_per_s", "examples", "dropped", "truncated",
            "tokenizer_fingerprint"} <= set(metrics)
    assert metrics["steps"] == 6 and metrics["examples"] == 12 and metrics["tokens_per_s"] > 0
    assert metrics["mixed_precision"] == ("bf16" if cpu_has_native_bf16() else "no")
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["modules_to_save"] is None and adapter_config["r"] == 4
    table = pq.read_table(tmp_path / "losses.parquet")
    assert table.schema.equals(LOSSES) and table.num_rows == 6
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"

    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    base = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    prompt = tokenizer("Question: what is 2 + 3?", return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**prompt).logits
        model = PeftModel.from_pretrained(base, tmp_path / "adapter")
        tuned_logits = model(**prompt).logits
        generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert not torch.allclose(base_logits, tuned_logits)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4


def test_nonfinite_loss_stops_before_the_update(tiny_student):
    cfg = small_cfg(tiny_student)
    run = setup_run(cfg, make_examples(4), make_accelerator(cfg))
    lora_b = next(p for name, p in run.model.named_parameters() if "lora_B" in name)
    with torch.no_grad():
        lora_b.fill_(float("nan"))
    a_before = {n: p.detach().clone() for n, p in run.model.named_parameters() if "lora_A" in n}
    with pytest.raises(NonFiniteLossError, match="optimizer step 1"):
        run_steps(run, make_accelerator(cfg), LoopState(), Path("/nonexistent/never-written"))
    assert all(torch.equal(a_before[n], p) for n, p in run.model.named_parameters() if "lora_A" in n)


def test_empty_training_set_is_a_clear_error(tiny_student, tmp_path):
    with pytest.raises(ValueError, match="training set is empty"):
        train_lora(small_cfg(tiny_student), [], tmp_path)
    with pytest.raises(ValueError, match="all 3 training examples were dropped"):
        train_lora(small_cfg(tiny_student, max_length=16, overflow="drop"), make_examples(3), tmp_path)


def test_student_whose_template_cannot_render_tool_turns_is_rejected(tiny_student, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(tiny_student, student)
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    (student / "chat_template.jinja").write_text(template)
    with pytest.raises(TemplateError, match=f"{student}.*System role not supported"):
        train_lora(small_cfg(student), make_examples(3), tmp_path / "out")


@pytest.mark.slow
def test_smollm2_student_trains_from_the_embedded_gguf(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from models.resolve import resolve_model

    cfg = TrainConfig(epochs=1, max_steps=2, max_length=512, per_device_batch_size=2, grad_accum=2)
    metrics = train_lora(cfg, make_examples(8), tmp_path)
    assert metrics["steps"] == 2 and math.isfinite(metrics["final_loss"]) and metrics["final_loss"] < 10
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "smollm2-135m-instruct"
    assert adapter_config["r"] == 64 and adapter_config["lora_alpha"] == 128
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} == {
        name.rsplit(".", 1)[-1] for name in adapter_config["target_modules"]
    }
    source = resolve_model(adapter_config["base_model_name_or_path"])
    base = AutoModelForCausalLM.from_pretrained(source.path, **source.from_pretrained_kwargs(), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 6)
