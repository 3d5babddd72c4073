"""Chat examples and assistant-only labels, checked by hand against SmolLM2's ChatML template."""

from __future__ import annotations

import copy

import pytest

from training.examples import (
    IGNORE_INDEX,
    ExampleError,
    TemplateError,
    agent_messages,
    check_template,
    cot_messages,
    tokenize_example,
)

SYSTEM = "You are an agent. Use code."
QUESTION = "What is 6 * 7?"
STEPS = [
    ("Thought: search first.\nCode:\n```py\nprint(web_search('six'))\n```<end_code>", "Observation:\nsix is 6"),
    ("Thought: multiply.\nCode:\n```py\nprint(6 * 7)\n```<end_code>", "Observation:\n42"),
    ("Thought: answer.\nCode:\n```py\nfinal_answer(42)\n```<end_code>", "(never shown)"),
]


def labelled_runs(example) -> tuple[list[list[int]], list[list[int]]]:
    """Contiguous runs of labelled and of unlabelled token ids, in order."""
    labelled, unlabelled, current, inside = [], [], [], None
    for token, label in zip(example.input_ids, example.labels, strict=True):
        now = label != IGNORE_INDEX
        if inside is not None and now != inside:
            (labelled if inside else unlabelled).append(current)
            current = []
        if now:
            assert label == token
        current.append(token)
        inside = now
    (labelled if inside else unlabelled).append(current)
    return labelled, unlabelled


def test_agent_messages_alternate_and_end_with_the_final_action():
    messages = agent_messages(SYSTEM, QUESTION, STEPS)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert messages[3]["content"] == "Observation:\nsix is 6"
    assert messages[-1]["content"] == STEPS[-1][0]
    assert all("never shown" not in m["content"] for m in messages)


def test_labels_are_exactly_the_three_assistant_turns(smollm_tokenizer):
    example = tokenize_example(smollm_tokenizer, agent_messages(SYSTEM, QUESTION, STEPS), 4096, "truncate")
    labelled, unlabelled = labelled_runs(example)
    decode = smollm_tokenizer.decode
    # Each assistant turn is labelled with its content and the <|im_end|> that stops generation.
    assert [decode(run) for run in labelled] == [f"{text}<|im_end|>" for text, _ in STEPS]
    # Everything else (system, question, observations, role headers, newlines) is -100.
    assert [decode(run) for run in unlabelled] == [
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
        "\n<|im_start|>user\nObservation:\nsix is 6<|im_end|>\n<|im_start|>assistant\n",
        "\n<|im_start|>user\nObservation:\n42<|im_end|>\n<|im_start|>assistant\n",
        "\n",
    ]
    assert decode(example.input_ids) == smollm_tokenizer.apply_chat_template(
        agent_messages(SYSTEM, QUESTION, STEPS), tokenize=False
    )
    assert not example.truncated


def test_cot_example_labels_only_the_solution(smollm_tokenizer):
    example = tokenize_example(smollm_tokenizer, cot_messages(SYSTEM, QUESTION, "6*7 = 42. \\boxed{42}"), 512, "drop")
    labelled, _ = labelled_runs(example)
    assert [smollm_tokenizer.decode(run) for run in labelled] == ["6*7 = 42. \\boxed{42}<|im_end|>"]


def test_overlong_example_is_truncated_after_the_last_fitting_turn_or_dropped(smollm_tokenizer):
    messages = agent_messages(SYSTEM, QUESTION, STEPS)
    full = tokenize_example(smollm_tokenizer, messages, 4096, "truncate")
    two_turns = tokenize_example(smollm_tokenizer, messages[:5], 4096, "truncate")
    budget = len(full.input_ids) - 5  # the third turn no longer fits
    cut = tokenize_example(smollm_tokenizer, messages, budget, "truncate")
    assert cut.truncated
    # The kept part is the two-turn example up to its second <|im_end|> (its trailing newline is scaffolding).
    assert cut.input_ids == two_turns.input_ids[:-1]
    assert cut.labels == two_turns.labels[:-1]
    assert tokenize_example(smollm_tokenizer, messages, budget, "drop") is None
    assert tokenize_example(smollm_tokenizer, messages, 20, "truncate") is None  # not even turn one fits


def test_malformed_examples_are_rejected(smollm_tokenizer):
    with pytest.raises(ExampleError, match="no steps"):
        agent_messages(SYSTEM, QUESTION, [])
    bad = agent_messages(SYSTEM, QUESTION, STEPS)[:-1]  # ends with an observation
    with pytest.raises(ExampleError, match="role 'user', expected 'assistant'|must end with an assistant"):
        tokenize_example(smollm_tokenizer, bad, 4096, "truncate")
    swapped = [{"role": "user", "content": QUESTION}, {"role": "system", "content": SYSTEM},
               {"role": "assistant", "content": "x"}]
    with pytest.raises(ExampleError, match="message 0 has role 'user', expected 'system'"):
        tokenize_example(smollm_tokenizer, swapped, 4096, "truncate")


def test_check_template_accepts_chatml(smollm_tokenizer):
    check_template(smollm_tokenizer, "smollm2-135m-instruct")


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (None, "has no chat template"),
        (  # rejects system/tool turns, like some templates do with raise_exception
            ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
             "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
             "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"),
            "cannot render system/user/assistant/user",
        ),
        (  # silently drops the system prompt
            ("{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
             "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:\n{% endif %}"),
            "does not render the system message",
        ),
        (  # re-renders history (earlier assistant turns get another header): prefixes are not token-prefixes
            ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
             "{{ 'assistant (earlier):\n' + m['content'] + '\n' }}"
             "{% else %}{{ m['role'] + ':\n' + m['content'] + '\n' }}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}assistant:\n{% endif %}"),
            "is not a token-prefix",
        ),
    ],
)
def test_check_template_rejects_templates_that_cannot_render_agent_turns(smollm_tokenizer, template, message):
    tokenizer = copy.deepcopy(smollm_tokenizer)
    tokenizer.chat_template = template
    with pytest.raises(TemplateError, match=message) as error:
        check_template(tokenizer, "my-student")
    assert "my-student" in str(error.value)
