"""On-policy distillation's pieces on tiny models: which tokens carry loss, the estimator's gradient, and one
iteration on the student's own samples lowering its (sampled) reverse KL to the teacher."""

import pytest
import torch

from agent_runtime.backends import BackendConfig
from agent_runtime.backends.transformers_backend import TransformersGenerator
from agent_runtime.generation import Request
from training.examples import ExampleError
from training.opd import (
    OpdConfig,
    OpdExample,
    align_turns,
    opd_example,
    opd_loss,
    step_baseline,
    token_logprobs,
    train_iteration,
    trained_tokens,
)

CONVERSATION = [
    {"role": "system", "content": "You are an agent that writes code."},
    {"role": "user", "content": "Task: What is 2 + 3?"},
    {"role": "assistant", "content": "Thought: I add them.\nCode:\n```py\nprint(2 + 3)\n```<end_code>"},
    {"role": "user", "content": "Observation:\n5"},
    {"role": "assistant", "content": "Thought: done.\nCode:\n```py\nfinal_answer('5')\n```<end_code>"},
]


def turn_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(m["content"], add_special_tokens=False).input_ids for m in CONVERSATION if m["role"] == "assistant"]


def test_only_the_assistant_turns_tokens_carry_loss(smollm_tokenizer):
    full, turns = align_turns(smollm_tokenizer, CONVERSATION, turn_ids(smollm_tokenizer), [False, True])
    example = opd_example(("d", "q", 0), full, turns, [[0.0] * len(t.token_ids) for t in turns], max_length=4096)
    texts = [smollm_tokenizer.decode([full[p] for p in range(t.start, t.start + len(t.token_ids))]) for t in turns]
    assert texts == [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert example.positions == [p for t in turns for p in range(t.start, t.start + len(t.token_ids))]
    # No system, user (question, observation) or template token is among them.
    rendered_user = smollm_tokenizer("Observation:\n5", add_special_tokens=False).input_ids
    observation_at = next(i for i in range(len(full)) if full[i:i + len(rendered_user)] == rendered_user)
    assert not set(range(observation_at, observation_at + len(rendered_user))) & set(example.positions)
    assert max(example.positions) < len(full) - 1  # the closing end-of-turn token was not generated text
    first, last = example.segments[:len(turns[0].token_ids)], example.segments[len(turns[0].token_ids):]
    assert first[:3] == ["thought"] * 3 and "code" in first and set(last) == {"final", "stop"}
    # The <end_code> marker that ended each action is its own segment: exactly its tokens, at the turn's end.
    for turn, segments in zip(turns, (first, last)):
        stop = [tid for tid, segment in zip(turn.token_ids, segments) if segment == "stop"]
        assert segments[-len(stop):] == ["stop"] * len(stop)
        assert smollm_tokenizer.decode(stop) == "<end_code>"


def test_an_episode_that_hit_the_step_limit_is_aligned_whole(smollm_tokenizer):
    """At the step limit the engine sends the last observation and its "final answer" instruction as two user
    messages before the final turn, and the stored episode ends with that turn's observation."""
    limit = [*CONVERSATION[:4], {"role": "user", "content": "You have reached the maximum number of steps."},
             *CONVERSATION[4:], {"role": "user", "content": "Observation:\n5"}]
    full, turns = align_turns(smollm_tokenizer, limit, turn_ids(smollm_tokenizer), [False, True])
    assert [t.step for t in turns] == [1, 2]
    assert [full[t.start:t.start + len(t.token_ids)] for t in turns] == turn_ids(smollm_tokenizer)
    rendered = smollm_tokenizer.apply_chat_template(limit[:-1], tokenize=False)
    assert full == smollm_tokenizer(rendered, add_special_tokens=False).input_ids  # the trailing observation is cut
    with pytest.raises(ExampleError, match="message 3 has role 'assistant', expected 'user'"):
        align_turns(smollm_tokenizer, [*CONVERSATION[:3], *CONVERSATION[2:]], turn_ids(smollm_tokenizer) * 2, [False] * 3)


def test_the_loss_reads_only_the_logits_that_predict_generated_tokens(tiny_student, smollm_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    full, turns = align_turns(smollm_tokenizer, CONVERSATION, turn_ids(smollm_tokenizer), [False, True])
    example = opd_example(("d", "q", 0), full, turns, [[-1.0] * len(t.token_ids) for t in turns], max_length=4096)
    captured = {}

    class Recorder(torch.nn.Module):  # hands the logits out so the test can take their gradient
        def forward(self, **kwargs):
            captured["kept"] = kwargs["logits_to_keep"].tolist()
            out = model(**kwargs)
            out.logits.retain_grad()
            captured["logits"] = out.logits
            return out

    logprobs = token_logprobs(Recorder(), example, torch.device("cpu"))
    loss, stats = opd_loss(logprobs, logprobs.detach(), torch.tensor(example.teacher), kl_clip=5.0)
    loss.backward()
    assert captured["kept"] == [p - 1 for p in example.positions]  # logits at p - 1 predict the token at p
    assert bool((captured["logits"].grad[0].abs().sum(-1) > 0).all())  # and each of them gets a gradient
    assert stats["tokens"] == len(example.positions)
    with torch.no_grad():  # the same log-probs as from the full logits
        reference = model(input_ids=torch.tensor([full])).logits[0].log_softmax(-1)
    expected = [float(reference[p - 1, full[p]]) for p in example.positions]
    assert logprobs.tolist() == pytest.approx(expected, abs=0.05)


def test_the_estimator_is_the_reinforce_gradient_with_the_clipped_log_ratio():
    logprobs = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    old = logprobs.detach().clone()
    teacher = torch.tensor([-0.5, -9.0, -3.0])
    loss, stats = opd_loss(logprobs, old, teacher, kl_clip=2.0)
    loss.backward()
    # d loss / d log π = −clip(log π_T − log π_old) at π = π_old
    assert logprobs.grad.tolist() == pytest.approx([-0.5, 2.0, 0.0])
    assert stats == {"tokens": 3, "kl_sum": pytest.approx(-0.5 + 7.0 + 0.0), "clipped": 1}


def test_the_batch_mean_baseline_is_the_steps_mean_clipped_advantage_and_shifts_every_tokens_gradient():
    examples = [OpdExample(("d", "q", 0), [], [], teacher=[-0.5, -9.0], old=[-1.0, -2.0], steps=[], segments=["code"] * 2),
                OpdExample(("d", "q", 1), [], [], teacher=[-3.0], old=[-3.0], steps=[], segments=["code"]),
                OpdExample(("d", "q", 2), [], [], teacher=[0.0], old=[-4.0], steps=[], segments=["code"])]
    mean = OpdConfig(kl_clip=2.0, baseline="batch_mean")
    # clipped advantages of episodes 0 and 1: 0.5, -2.0 (clipped from -7.0), 0.0; episode 2 is not in the step
    assert step_baseline(examples, [0, 1], mean) == pytest.approx(-0.5)
    assert step_baseline(examples, [2], mean) == pytest.approx(2.0)
    assert step_baseline(examples, [0, 1], OpdConfig(kl_clip=2.0)) == 0.0
    logprobs = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    loss, stats = opd_loss(logprobs, logprobs.detach().clone(), torch.tensor([-0.5, -9.0, -3.0]), kl_clip=2.0,
                           baseline=-0.5)
    loss.backward()
    assert logprobs.grad.tolist() == pytest.approx([-1.0, 1.5, -0.5])
    assert float(loss) == pytest.approx(0.0)  # at π = π_old the advantages minus their mean sum to zero
    assert stats["kl_sum"] == pytest.approx(6.5)  # the reported KL does not include the baseline


def test_a_masked_stop_marker_carries_no_loss_and_no_part_of_the_baseline():
    segments = ["thought", "code", "stop", "stop"]
    example = OpdExample(("d", "q", 0), [], [], teacher=[-0.5, -1.0, -3.0, -2.0], old=[-1.0, -1.0, -0.01, -0.01],
                         steps=[1] * 4, segments=segments)
    masked, scored = OpdConfig(baseline="batch_mean"), OpdConfig(baseline="batch_mean", stop_marker="scored")
    assert masked.stop_marker == "masked"  # the default
    assert step_baseline([example], [0], masked) == pytest.approx((0.5 + 0.0) / 2)
    assert step_baseline([example], [0], scored) == pytest.approx((0.5 + 0.0 - 2.99 - 1.99) / 4)
    for cfg, expected in ((masked, [-0.25, 0.25, 0.0, 0.0]), (scored, [-1.62, -1.12, 1.87, 0.87])):
        logprobs = torch.tensor(example.old, requires_grad=True)
        keep = torch.tensor(trained_tokens(example, cfg))
        loss, stats = opd_loss(logprobs, logprobs.detach().clone(), torch.tensor(example.teacher), kl_clip=5.0,
                               baseline=step_baseline([example], [0], cfg), trained=keep)
        loss.backward()
        assert logprobs.grad.tolist() == pytest.approx(expected, abs=1e-6)
        assert stats["tokens"] == (2 if cfg is masked else 4)


def test_misaligned_scores_are_refused(smollm_tokenizer):
    ids = turn_ids(smollm_tokenizer)
    ids[1] = ids[1][1:]  # not the turn's tokens
    with pytest.raises(ExampleError, match="assistant turn 2"):
        align_turns(smollm_tokenizer, CONVERSATION, ids, [False, True])


def sampled_reverse_kl(student, examples: list[OpdExample]) -> float:
    """The reverse KL of the student to the teacher estimated on the fixed samples: the mean over the sampled
    tokens of r · (log π_θ − log π_T), r = π_θ / π_old the importance weight of a token drawn from π_old (at
    each position the context is fixed, so this is unbiased for that position's KL(π_θ ‖ π_T))."""
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            lp = token_logprobs(student, example, torch.device("cpu"))
            ratio = torch.exp(lp - torch.tensor(example.old))
            total += float((ratio * (lp - torch.tensor(example.teacher))).sum())
            count += lp.numel()
    return total / count


@pytest.mark.parametrize("baseline", ["none", "batch_mean"])
def test_one_iteration_on_its_own_samples_lowers_the_students_reverse_kl(tiny_student, smollm_tokenizer, tmp_path,
                                                                         baseline):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    # The teacher: another tiny model with the student's tokenizer (as Qwen2.5-Coder 1.5B and 0.5B share one).
    config = LlamaConfig.from_pretrained(tiny_student)
    torch.manual_seed(7)
    teacher_dir = tmp_path / "teacher"
    LlamaForCausalLM(config).save_pretrained(teacher_dir)
    smollm_tokenizer.save_pretrained(teacher_dir)
    teacher = TransformersGenerator(BackendConfig(kind="transformers", model=str(teacher_dir), dtype="float32"))

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    student = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    student.eval()
    # The student's own trajectories: 12 answers sampled from it after a fixed prompt, scored by the teacher
    # through Generator.score in the same context.
    request = Request([{"role": "user", "content": "Task: What is 2 + 3?"}])
    prompt = smollm_tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = smollm_tokenizer(prompt, add_special_tokens=False).input_ids
    generator = torch.Generator().manual_seed(0)
    examples = []
    for sample in range(12):
        ids = list(prompt_ids)
        with torch.no_grad():
            for _ in range(12):
                probs = student(input_ids=torch.tensor([ids])).logits[0, -1].float().softmax(-1)
                ids.append(int(torch.multinomial(probs, 1, generator=generator)))
        completion = ids[len(prompt_ids):]
        (scored,) = teacher.score([request], [smollm_tokenizer.decode(completion)])
        if scored.token_ids != completion:  # a sample that does not re-tokenise the same: not this test's point
            continue
        examples.append(OpdExample(("d", "q", sample), ids, list(range(len(prompt_ids), len(ids))),
                                   scored.logprobs, [], [1] * len(completion), ["thought"] * len(completion)))
    assert len(examples) >= 6
    with torch.no_grad():
        for example in examples:
            example.old = token_logprobs(student, example, torch.device("cpu")).tolist()
    before = sampled_reverse_kl(student, examples)
    cfg = OpdConfig(learning_rate=1e-2, episodes_per_step=2, epochs=1, kl_clip=5.0, baseline=baseline)
    rows = train_iteration(student, examples, cfg, iteration=1, device=torch.device("cpu"))
    after = sampled_reverse_kl(student, examples)
    assert len(rows) == -(-len(examples) * cfg.epochs // cfg.episodes_per_step) and all(r["tokens"] > 0 for r in rows)
    assert all((r["baseline"] == 0.0) == (baseline == "none") for r in rows)
    assert after < 0.7 * before, (before, after)


def test_the_teacher_can_score_under_its_own_system_prompt():
    from agent_runtime.prompts import TEACHER_SYSTEM_PROMPT
    from tasks.opd import turn_requests

    own = turn_requests(CONVERSATION)
    teachers = turn_requests(CONVERSATION, TEACHER_SYSTEM_PROMPT)
    assert [text for _, text in teachers] == [text for _, text in own]  # the same tokens are scored
    for (mine, _), (theirs, _) in zip(own, teachers):
        assert mine.messages[0] == CONVERSATION[0]
        assert theirs.messages[0] == {"role": "system", "content": TEACHER_SYSTEM_PROMPT}
        assert theirs.messages[1:] == mine.messages[1:]
    assert OpdConfig().scorer_prompt == "student"  # the published setting is the default
    with pytest.raises(ExampleError, match="system message"):
        turn_requests(CONVERSATION[1:], TEACHER_SYSTEM_PROMPT)
