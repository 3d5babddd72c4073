"""Atomic, resumable training checkpoints.

A checkpoint is a folder ``<root>/step-00000050/`` holding what ``Accelerator.save_state`` writes
(optimizer, registered scheduler, per-process RNG states of python/numpy/torch, the accumulation step
counter; FSDP/DeepSpeed shards when those are used) with the model weights trimmed to the trainable
LoRA parameters (a few MB instead of the whole base model), plus ``progress.json`` (the loop's own
state: step, tokens, loss history, run fingerprint) and finally the completion marker ``COMPLETE``.

Writing is atomic: everything goes to ``<root>/.tmp-step-00000050/``; the marker is written last,
then the folder is renamed into place. A folder without the marker (a run killed mid-write, or a
stale temporary) is never read: :func:`latest_checkpoint` ignores it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from common.files import move_dir_into_place

MARKER = "COMPLETE"
PROGRESS = "progress.json"
WEIGHTS = "model.safetensors"  # the name accelerate's save_state uses for the first model
_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume this run."""


def checkpoint_path(root: Path, step: int) -> Path:
    """Where the checkpoint after optimizer step ``step`` lives."""
    return root / f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """All complete checkpoints under ``root`` (name matches and marker present), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint, or None. Folders without the completion marker are ignored."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def install_adapter_state_hooks(accelerator, model: torch.nn.Module) -> None:
    """Make ``save_state``/``load_state`` store only the trainable (LoRA) weights of ``model``.

    The frozen base weights are reloaded from the base model on resume, so saving them in every
    checkpoint would only cost time and disk. Loading checks that exactly the trainable parameters
    are restored.
    """
    # Names are those of the unwrapped model: DDP prefixes its parameters with "module.", and a
    # checkpoint must not depend on how many processes wrote it.
    inner = accelerator.unwrap_model(model)
    trainable = {name for name, param in inner.named_parameters() if param.requires_grad}

    def trim(models, weights, output_dir):
        for index, state in enumerate(weights):
            weights[index] = {k.removeprefix("module."): v for k, v in state.items()
                              if k.removeprefix("module.") in trainable}

    def restore(models, input_dir):
        if not models:  # FSDP / DeepSpeed: accelerate loads their sharded states itself
            return
        # Read on the CPU: safetensors rejects accelerate's multi-process CPU device "cpu:0", and
        # load_state_dict copies the (few MB of) LoRA weights to the parameters' device anyway.
        state = load_file(Path(input_dir) / WEIGHTS, device="cpu")
        if set(state) != trainable:
            missing, extra = sorted(trainable - set(state))[:3], sorted(set(state) - trainable)[:3]
            raise CheckpointError(
                f"checkpoint {input_dir} does not hold this run's LoRA weights "
                f"(missing e.g. {missing}, unexpected e.g. {extra})"
            )
        inner.load_state_dict(state, strict=False)
        models.clear()  # tells accelerate the models are loaded

    accelerator.register_save_state_pre_hook(trim)
    accelerator.register_load_state_pre_hook(restore)


def save_checkpoint(accelerator, root: Path, step: int, progress: dict, keep: int) -> Path:
    """Write the checkpoint of optimizer step ``step`` atomically; keep the newest ``keep`` ones.

    Every process must call this (accelerate saves per-process RNG states and, under FSDP, shards).
    """
    final = checkpoint_path(root, step)
    temporary = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_synced(temporary / PROGRESS, json.dumps(progress))
        _write_synced(temporary / MARKER, f"step {step}\n")
        move_dir_into_place(temporary, final)  # a resumed run re-saving the same step replaces the old copy
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore model (LoRA weights), optimizer, scheduler and RNG states from ``path``; return its
    progress record. Raises CheckpointError for a folder without the completion marker."""
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path} has no {MARKER} marker: it is incomplete and cannot be resumed from")
    accelerator.load_state(str(path))
    return json.loads((path / PROGRESS).read_text())


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
