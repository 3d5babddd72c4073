"""The agent engine driven by scripted models through the real sandbox; SAG voting; FTP; CoT; one real model run."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from agent_runtime.backends.scripted import ScriptedGenerator
from agent_runtime.cot import first_step, run_cot
from agent_runtime.engine import AgentConfig, AgentTask, SagConfig, run_agent, stable_seed
from agent_runtime.execution import ExecResult
from agent_runtime.generation import Completion, GenerationError, Request, Sampling
from agent_runtime.parsing import NO_CODE_ERROR, parse_action
from agent_runtime.prompts import (
    STOP_SEQUENCES,
    STUDENT_SYSTEM_PROMPT,
    finalize_message,
    format_action,
    observation_message,
    question_message,
)
from agent_runtime.sag import NO_GROUP, Candidate, vote
from agent_runtime.sandbox import Sandbox, SandboxConfig

Step = str | list[str]  # one scripted action, or the N candidates of a SAG step


def act(code: str, thought: str = "step") -> str:
    """A well-formed action as a model would generate it (the stop string is cut by the backend)."""
    return format_action(thought, code)


def per_question(script: dict[str, list[Step]]) -> Callable[[Request, int], str]:
    """A scripted model that plays each question's steps in turn, whatever the batch order."""
    taken: Counter[str] = Counter()

    def complete(request: Request, sample_index: int) -> str:
        question = request.messages[1]["content"].removeprefix("Task: ")
        if sample_index == 0:
            taken[question] += 1
        step = script[question][taken[question] - 1]
        return step if isinstance(step, str) else step[sample_index]

    return complete


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(SandboxConfig(workers=2)) as box:
        yield box


def run(script: dict[str, list[Step]], sandbox, cfg: AgentConfig | None = None, **task_kw):
    """Run one episode per scripted question; returns (episodes, the scripted generator)."""
    generator = ScriptedGenerator(per_question(script))
    tasks = [AgentTask(question_id=f"q{i}", question=q, **task_kw) for i, q in enumerate(script)]
    return run_agent(tasks, generator, sandbox, cfg or AgentConfig()), generator


def test_final_answer_in_step_one(sandbox) -> None:
    script = {"What is 6*7?": [act("print('computing')\nfinal_answer(6 * 7)")], "Capital of France?": [
        act('final_answer("Paris")')]}
    episodes, generator = run(script, sandbox, AgentConfig(prompt="student"))
    assert [e.prediction for e in episodes] == ["42", "Paris"]
    assert [e.error for e in episodes] == [None, None]
    first = episodes[0]
    assert first.num_steps == 1
    step = first.steps[0]
    assert step.is_final and step.error_kind == "none" and step.observation_message == ""
    assert step.code == "print('computing')\nfinal_answer(6 * 7)" and step.thought == "step"
    assert "computing" in step.observation
    assert step.assistant == script["What is 6*7?"][0]  # the stop string, cut by the backend, is restored
    assert first.messages == [
        {"role": "system", "content": STUDENT_SYSTEM_PROMPT},
        question_message("What is 6*7?"),
        {"role": "assistant", "content": step.assistant},
    ]
    assert step.completion_tokens == len(step.assistant.removesuffix("<end_code>").split())
    assert first.completion_tokens == step.completion_tokens and first.prompt_tokens == step.prompt_tokens > 0
    # one batched call for both episodes, with the CodeAct stop strings
    assert len(generator.calls) == 1
    requests, sampling = generator.calls[0]
    assert len(requests) == 2 and sampling.stop == STOP_SEQUENCES and sampling.n == 1
    assert step.candidates == [] and step.vote == {}


def test_parse_error_is_recorded_and_fed_back(sandbox) -> None:
    script = {"q": ["Thought: I just know it is 4.", act("final_answer(4)")]}
    (episode,), _ = run(script, sandbox)
    parse_step, final_step = episode.steps
    assert parse_step.error_kind == "parse" and parse_step.code is None
    assert parse_step.observation == NO_CODE_ERROR
    assert parse_step.assistant == "Thought: I just know it is 4."  # unparseable text is kept verbatim
    assert episode.messages[3] == observation_message(NO_CODE_ERROR)
    assert parse_step.observation_message == episode.messages[3]["content"]
    assert final_step.is_final and episode.prediction == "4"


def test_a_boxed_answer_in_prose_ends_the_episode(sandbox) -> None:
    # What the 1.5B teacher does after seeing its result: it answers in prose instead of calling final_answer.
    prose = r"The remaining amount Aiko has is \(\boxed{21794391}\) dollars."
    script = {"q": [act("print(7517486 * 47 - 331527451)"), prose, act("final_answer('unused')")]}
    (episode,), generator = run(script, sandbox)
    assert episode.prediction == "21794391" and episode.error is None
    assert len(generator.calls) == 2 and episode.num_steps == 2
    step = episode.steps[1]
    assert step.is_final and step.error_kind == "none" and step.code is None and step.observation == ""
    assert step.assistant == prose and episode.messages[-1] == {"role": "assistant", "content": prose}

    # Off, the same text is a parse error and the episode goes on to its next action.
    (strict,), _ = run(script, sandbox, AgentConfig(boxed_answer=False))
    assert strict.steps[1].error_kind == "parse" and strict.steps[1].observation == NO_CODE_ERROR
    assert strict.prediction == "unused" and strict.num_steps == 3


def test_a_boxed_answer_only_counts_without_code(sandbox) -> None:
    # Code wins: a \boxed{} in the thought of an action with code is not an answer, and prose without a box
    # is still a parse error.
    with_code = act("print(2 + 2)", thought=r"I guess \boxed{5}, let me check")
    script = {"q": [with_code, "The answer is 4.", act("final_answer(4)")]}
    (episode,), _ = run(script, sandbox)
    assert [s.error_kind for s in episode.steps] == ["none", "parse", "none"]
    assert episode.prediction == "4"
    assert parse_action(with_code).answer is None and parse_action("so x = \\boxed{a_{1}}").answer == "a_{1}"


def test_execution_error_is_recorded_and_fed_back(sandbox) -> None:
    script = {"q": [act("x = 1 / 0"), act("final_answer('recovered')")]}
    (episode,), generator = run(script, sandbox)
    error_step = episode.steps[0]
    assert error_step.error_kind == "execution"
    assert "ZeroDivisionError" in error_step.observation
    assert episode.messages[3]["content"] == "Observation:\n" + error_step.observation
    # the model saw the error before its second action
    assert generator.requests[1].messages[-1]["content"] == episode.messages[3]["content"]
    assert episode.prediction == "recovered"


def test_action_cut_by_the_token_limit_is_kept_verbatim(sandbox) -> None:
    cut = "Thought: long\nCode:\n```py\nvalues = [1, 2,\n 3, 4, 5, 6, 7, 8, 9]\nprint(sum(values))\n```"
    script = {"q": [cut, act("final_answer(1)")]}
    (episode,), _ = run(script, sandbox, AgentConfig(max_new_tokens=8))
    step = episode.steps[0]
    assert step.assistant == "Thought: long\nCode:\n```py\nvalues = [1, 2,"  # 8 words, no terminator
    assert step.error_kind == "execution" and "SyntaxError" in step.observation


def test_state_persists_between_steps(sandbox) -> None:
    script = {"q": [act("x = 41\nprint(x)"), act("final_answer(x + 1)")]}
    (episode,), _ = run(script, sandbox)
    assert episode.steps[0].observation.strip() == "41"
    assert episode.prediction == "42"


def test_running_out_of_steps_makes_one_finalising_call(sandbox) -> None:
    script = {
        "stubborn": [act("print('thinking')")] * 3,
        "obedient": [act("print('thinking')")] * 2 + [act("final_answer(7)")],
    }
    cfg = AgentConfig(max_steps=2)
    (stubborn, obedient), generator = run(script, sandbox, cfg)
    assert [len(requests) for requests, _ in generator.calls] == [2, 2, 2]
    last_requests, _ = generator.calls[-1]
    assert all(r.messages[-1] == finalize_message() for r in last_requests)
    assert all(r.messages[-2]["content"].startswith("Observation:") for r in last_requests)
    assert stubborn.prediction is None and stubborn.error == "max_steps" and stubborn.num_steps == 3
    assert stubborn.steps[-1].observation_message == ""  # nothing is fed back after the finalising action
    assert stubborn.messages[-1]["role"] == "assistant"
    assert stubborn.messages.count(finalize_message()) == 1
    assert obedient.prediction == "7" and obedient.error is None and obedient.steps[-1].step == 3


def test_population_advances_step_synchronously_with_stable_seeds(sandbox) -> None:
    script = {
        "one": [act("final_answer(1)")],
        "two": [act("print(2)"), act("final_answer(2)")],
        "three": [act("print(3)"), act("print(3)"), act("final_answer(3)")],
    }
    progress: list[tuple[int, int]] = []
    generator = ScriptedGenerator(per_question(script))
    tasks = [AgentTask(question_id=q, question=q) for q in script]
    episodes = run_agent(tasks, generator, sandbox, AgentConfig(seed=5), on_progress=lambda d, t: progress.append((d, t)))
    assert [len(requests) for requests, _ in generator.calls] == [3, 2, 1]
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert [e.num_steps for e in episodes] == [1, 2, 3]
    seeds = [r.seed for r in generator.requests]
    assert len(set(seeds)) == len(seeds)
    assert generator.requests[0].seed == stable_seed(5, "one", 0, 1)
    assert stable_seed(5, "one", 0, 1) == stable_seed(5, "one", 0, 1) != stable_seed(5, "one", 1, 1)


def test_duplicate_tasks_are_rejected(sandbox) -> None:
    tasks = [AgentTask("q1", "a"), AgentTask("q1", "b")]
    with pytest.raises(ValueError, match="duplicate task: question 'q1' sample 0"):
        run_agent(tasks, ScriptedGenerator([]), sandbox, AgentConfig())


def test_backend_returning_too_few_completions_is_an_error(sandbox) -> None:
    class Short(ScriptedGenerator):
        def generate(self, requests, sampling):
            return super().generate(requests, sampling)[:-1]

    with pytest.raises(GenerationError, match="returned 0 generations for 1 requests"):
        run_agent([AgentTask("q", "q")], Short([act("final_answer(1)")]), sandbox, AgentConfig())


# --- SAG ---------------------------------------------------------------------------------------------

SAG4 = AgentConfig(sag=SagConfig(enabled=True, n=4))


def test_sag_vote_keeps_the_majority_and_isolates_losing_state(sandbox) -> None:
    step1 = [
        act("x = 1\nloser = True\nprint('one')"),
        act("x = 2\nprint('two')"),
        "Thought: no code here",
        act("x = 2\nprint('tw' + 'o')"),
    ]
    step2 = [act("try:\n    print(loser)\nexcept NameError:\n    final_answer(x)")] * 4
    (episode,), generator = run({"q": [step1, step2]}, sandbox, SAG4)
    _, sampling = generator.calls[0]
    assert (sampling.n, sampling.temperature, sampling.top_p) == (4, 0.4, 0.8)
    first = episode.steps[0]
    assert first.vote == {"groups": [1, 2], "winner": 1, "winner_group": 1, "all_failed": False}
    assert [c["group"] for c in first.candidates] == [0, 1, NO_GROUP, 1]
    assert [c["error_kind"] for c in first.candidates] == ["none", "none", "parse", "none"]
    assert first.candidates[0]["text"] == step1[0] and first.assistant == step1[1]
    assert first.observation.strip() == "two" and first.code == "x = 2\nprint('two')"
    assert first.completion_tokens == sum(len(t.split()) for t in step1)
    # the winner's x survives; the loser's assignments are gone
    assert episode.prediction == "2"
    assert episode.messages[2]["content"] == step1[1]


def test_sag_counts_the_final_answer_as_part_of_the_observation(sandbox) -> None:
    step = [act("final_answer(3)"), act("final_answer(4)"), act("print(  # broken"), act("final_answer(4)")]
    (episode,), _ = run({"q": [step]}, sandbox, SAG4)
    assert episode.prediction == "4"
    assert episode.steps[0].vote["groups"] == [1, 2]
    assert episode.steps[0].candidates[2]["error_kind"] == "execution"


def test_sag_keeps_one_failure_when_all_fail(sandbox) -> None:
    step1 = [act("y = 1 / 0"), "no code", act("undefined_name"), act("raise ValueError('bad')")]
    step2 = [act("final_answer('ok')")] * 4
    (episode,), generator = run({"q": [step1, step2]}, sandbox, SAG4)
    first = episode.steps[0]
    assert first.vote["all_failed"] is True and first.vote["groups"] == [] and first.vote["winner"] == 0
    assert all(c["group"] == NO_GROUP for c in first.candidates)
    assert first.error_kind == "execution" and "ZeroDivisionError" in first.observation
    assert generator.requests[1].messages[-1] == observation_message(first.observation)
    assert episode.prediction == "ok"


def _candidate(observation: str, error_kind: str = "none", final: str | None = None) -> Candidate:
    result = ExecResult(observation=observation, error_kind=error_kind, is_final=final is not None, final_answer=final)
    return Candidate("", parse_action(act("pass")), Completion("", 0, 0, "stop", 0.0), result, state=None)


def test_vote_rules_without_a_sandbox() -> None:
    # equal after stripping; ties go to the group seen first
    outcome = vote([_candidate("a"), _candidate("b\n"), _candidate(" b"), _candidate("a ")])
    assert (outcome.winner, outcome.groups) == (0, [[0, 3], [1, 2]])
    # same printed output, different answers: different groups
    outcome = vote([_candidate("", final="1"), _candidate("", final="2"), _candidate("", final="2")])
    assert outcome.winner == 1
    # failures never win while something succeeded
    outcome = vote([_candidate("boom", "execution"), _candidate("boom", "timeout"), _candidate("ok")])
    assert (outcome.winner, outcome.all_failed) == (2, False)
    with pytest.raises(ValueError):
        vote([])


def test_sag_config_rejects_greedy_candidates() -> None:
    with pytest.raises(ValueError, match="needs temperature > 0"):
        SagConfig(enabled=True, n=4, temperature=0.0)
    with pytest.raises(ValueError):
        AgentConfig(max_steps=0)


# --- FTP and CoT --------------------------------------------------------------------------------------


def test_ftp_prefix_starts_the_first_assistant_turn(sandbox) -> None:
    prefix = "Multiply 6 by 7 first."
    continuation = " That gives the answer.\nCode:\n```py\nprint(6 * 7)\n```<end_code>"
    script = {"What is 6*7?": [continuation, act("final_answer(42)")]}
    (episode,), generator = run(script, sandbox, prefix=prefix)
    first_request, second_request = generator.requests
    assert first_request.continue_final is True
    assert first_request.messages[-1] == {"role": "assistant", "content": "Thought: " + prefix}
    assert episode.messages[2]["role"] == "assistant"
    assert episode.messages[2]["content"] == "Thought: " + prefix + continuation
    assert episode.steps[0].thought == prefix + " That gives the answer."
    assert episode.prefix == prefix
    assert second_request.continue_final is False and second_request.messages[-1]["role"] == "user"
    assert episode.prediction == "42"


def test_ftp_prefix_with_sag_prefixes_every_candidate(sandbox) -> None:
    step = [" so 42.\nCode:\n```py\nfinal_answer(42)\n```"] * 4
    (episode,), _ = run({"q": [step]}, sandbox, SAG4, prefix="6 times 7")
    assert all(c["text"].startswith("Thought: 6 times 7 so 42.") for c in episode.steps[0].candidates)
    assert episode.steps[0].assistant.endswith("```<end_code>")  # normalised terminator


def test_run_cot_and_first_step() -> None:
    text = "**Solution:**\n\nFirst, 6 times 7 is 42.\nThat is the product.\n\nSo the answer is 42.\n\nThe final answer is \\boxed{42}."
    generator = ScriptedGenerator([text])
    (result,) = run_cot([AgentTask("q1", "What is 6*7?")], generator, max_new_tokens=64, seed=3)
    assert (result.question_id, result.text) == ("q1", text)
    (request,), sampling = generator.calls[0]
    assert request.seed == stable_seed(3, "q1", 0, "cot") and sampling.max_new_tokens == 64
    assert first_step(text) == "First, 6 times 7 is 42.\nThat is the product."
    assert first_step("Step one.\nStep two.") == "Step one."
    assert first_step("  \n") == ""


# --- the scripted backend -----------------------------------------------------------------------------


def test_scripted_generator_stops_limits_and_records() -> None:
    generator = ScriptedGenerator(["a b Observation: c <end_code>", "one two three four"])
    sampling = Sampling(n=1, max_new_tokens=3, stop=STOP_SEQUENCES)
    first, second = generator.generate([Request([{"role": "user", "content": "hi there"}])] * 2, sampling)
    assert (first.completions[0].text, first.completions[0].stop) == ("a b ", "Observation:")
    c = second.completions[0]
    assert (c.text, c.finish_reason, c.completion_tokens, c.prompt_tokens) == ("one two three", "length", 3, 2)
    assert len(generator.requests) == 2
    with pytest.raises(GenerationError, match="ran out of completions after 2"):
        generator.generate([Request([])], sampling)


def test_scripted_generator_from_file(tmp_path: Path) -> None:
    good = tmp_path / "script.jsonl"
    good.write_text(json.dumps("first") + "\n\n" + json.dumps({"text": "second"}) + "\n")
    generator = ScriptedGenerator.from_file(good)
    out = generator.generate([Request([])], Sampling(n=2))
    assert [c.text for c in out[0].completions] == ["first", "second"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"ok"\n{not json}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        ScriptedGenerator.from_file(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('["ok", 3]')
    with pytest.raises(ValueError, match=r"wrong.json: item 1: expected a string"):
        ScriptedGenerator.from_file(wrong)


# --- a real model -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_runs_as_a_codeact_agent_with_sag(sandbox) -> None:
    """The embedded SmolLM2 through the transformers backend: 3 questions, SAG N=4, full step records.

    A 135M model rarely follows the CodeAct format, so this checks that every episode completes with
    complete, consistent records, not that it answers correctly. The short student prompt keeps the
    CPU prefill small (the teacher prompt is ~1,150 tokens, repeated for every sample).
    """
    from agent_runtime.backends import BackendConfig, make_generator

    # Every core: make test runs the real-model tests one at a time (on a 2-core AVX2 EPYC, 4 questions took
    # 58 s with 2 threads, 75 s with 1; 8 questions took 139 s).
    generator = make_generator(BackendConfig(kind="transformers", model="smollm2-135m-instruct"))
    pairs = [(12, 34), (56, 7), (1234, 5)]
    tasks = [AgentTask(f"arith-{i}", f"What is {a} * {b}?") for i, (a, b) in enumerate(pairs)]
    cfg = AgentConfig(max_steps=2, prompt="student", max_new_tokens=48, sag=SagConfig(enabled=True, n=4))
    try:
        episodes = run_agent(tasks, generator, sandbox, cfg)
    finally:
        generator.close()
    assert [e.question_id for e in episodes] == [t.question_id for t in tasks]
    for episode in episodes:
        assert 1 <= episode.num_steps <= cfg.max_steps + 1
        assert (episode.prediction is None) == (episode.error == "max_steps")
        assert episode.completion_tokens == sum(s.completion_tokens for s in episode.steps) > 0
        assert episode.prompt_tokens > 0 and episode.latency_s > 0
        assert episode.messages[0] == {"role": "system", "content": STUDENT_SYSTEM_PROMPT}
        assert [m["content"] for m in episode.messages if m["role"] == "assistant"] == [
            s.assistant for s in episode.steps
        ]
        for step in episode.steps:
            assert step.error_kind in {"none", "parse", "execution", "timeout", "memory", "forbidden", "crash"}
            assert (step.code is None) == (step.error_kind == "parse")
            assert step.assistant and step.prompt_tokens > 0 and step.completion_tokens > 0
            assert len(step.candidates) == 4
            assert 0 <= step.vote["winner"] < 4
            assert sum(step.vote["groups"]) == sum(c["group"] != NO_GROUP for c in step.candidates)
            assert step.candidates[step.vote["winner"]]["text"] == step.assistant
