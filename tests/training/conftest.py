"""Fixtures: a tiny random Llama student that shares SmolLM2's tokenizer and chat template.

Only the tokenizer is read from the embedded GGUF (a few seconds, once per session); the model is a
2-layer, hidden-64 random Llama, so a training step takes milliseconds on CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm_tokenizer():
    from training.sft import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, smollm_tokenizer) -> Path:
    """A folder with a tiny random LlamaForCausalLM and the SmolLM2 tokenizer (a valid base_model)."""
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


SYSTEM = "You solve tasks with Python code. End with final_answer(x)."


def make_examples(count: int, seed: int = 0) -> list[list[dict]]:
    """Synthetic agent trajectories of varied length (1-3 steps), deterministic in ``seed``."""
    import random

    from training.examples import agent_messages

    rng = random.Random(seed)
    examples = []
    for index in range(count):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        steps = []
        for step in range(rng.randint(1, 3)):
            words = " ".join(rng.choice(["sum", "compute", "check", "value", "then"]) for _ in range(rng.randint(3, 30)))
            steps.append((f"Thought: {words}.\nCode:\n```py\nx = {a} + {b} + {step}\nprint(x)\n```<end_code>",
                          f"Observation:\n{a + b + step}"))
        steps[-1] = (f"Thought: done.\nCode:\n```py\nfinal_answer({a + b})\n```<end_code>", "")
        examples.append(agent_messages(SYSTEM, f"Question {index}: what is {a} + {b}?", steps))
    return examples
