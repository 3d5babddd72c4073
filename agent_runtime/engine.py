"""The batched, step-synchronous CodeAct agent engine.

A population of episodes advances together: at each step every unfinished episode gets its next action
from ONE batched backend call (N samples each with SAG), all the actions run in ONE parallel sandbox
batch, and each episode keeps one action (the vote's winner with SAG, else its only action). An episode
ends when its code calls ``final_answer`` (or, with ``boxed_answer``, when an action has no code but gives a
``\\boxed{}`` answer in prose); after ``max_steps`` the survivors get a finalising user turn
and one more action, and those that still do not answer end with ``error="max_steps"``.

    episodes = run_agent(tasks, generator, sandbox, AgentConfig(sag=SagConfig(enabled=True, n=4)))

With FTP, ``AgentTask.prefix`` (the first step of a CoT solution) is forced as the start of the first
thought: the first request ends with the assistant message ``"Thought: <prefix>"`` and asks the backend
to continue it; the stored assistant message is the prefix plus the continuation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent_runtime.execution import ExecResult
from agent_runtime.generation import Completion, Generation, GenerationError, Generator, Request, Sampling
from agent_runtime.parsing import parse_action
from agent_runtime.prompts import (
    END_CODE,
    STOP_SEQUENCES,
    finalize_message,
    observation_message,
    question_message,
    system_prompt,
    thought_prefix,
)
from agent_runtime.sag import Candidate, candidate_records, vote, vote_record

if TYPE_CHECKING:
    from agent_runtime.sandbox import EpisodeState, Sandbox

MAX_STEPS_ERROR = "max_steps"


class SagConfig(BaseModel):
    """Self-consistent action generation: sample N actions per step and vote on their observations."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="Sample n candidate actions per step and keep the vote's winner.")
    n: int = Field(8, ge=1, description="Candidate actions sampled per episode and step.")
    temperature: float = Field(0.4, ge=0.0, description="Sampling temperature of the candidates.")
    top_p: float = Field(0.8, gt=0.0, le=1.0, description="Nucleus sampling threshold of the candidates.")

    @model_validator(mode="after")
    def _sampling_can_differ(self) -> SagConfig:
        if self.enabled and self.n > 1 and self.temperature == 0.0:
            raise ValueError("SAG with n > 1 needs temperature > 0: greedy candidates would all be equal")
        return self


class AgentConfig(BaseModel):
    """How an agent run samples and how long an episode may go on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_steps: int = Field(5, ge=1, description="Actions before the finalising call asks for the answer.")
    prompt: Literal["teacher", "student"] = Field(
        "teacher", description="Full teacher system prompt (tools, examples) or the short student one."
    )
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature without SAG (0 = greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold without SAG.")
    max_new_tokens: int = Field(512, ge=1, description="Token limit of one generated action.")
    sag: SagConfig = Field(SagConfig(), description="Self-consistent action generation settings.")
    seed: int = Field(0, description="Base seed; each request's seed also depends on question, sample, step.")
    boxed_answer: bool = Field(
        True, description="An action without code whose text gives a \\boxed{} answer ends the episode with it "
        "(the model answered in prose instead of calling final_answer); off: it is a parse error.",
    )


@dataclass
class AgentTask:
    """One episode to run: a question, which sample of it this is, and an optional FTP first step."""

    question_id: str
    question: str
    sample_index: int = 0
    prefix: str | None = None


@dataclass
class StepRecord:
    """One step of an episode: the kept action and what it did (plus, with SAG, every candidate)."""

    step: int
    thought: str
    code: str | None
    observation: str
    error_kind: str  # "none" | "parse" | "execution" | "timeout" | ... (agent_runtime.execution.ErrorKind)
    tool_calls: int
    prompt_tokens: int
    completion_tokens: int  # summed over all candidates of the step
    # Backends report each completion's share of its batch's wall time, so the sum over candidates is
    # this step's share of generation time; plus the kept action's execution time.
    latency_s: float
    is_final: bool
    assistant: str  # the exact assistant message (prefix included, terminated by <end_code>)
    observation_message: str  # the exact user message fed back after it ("" when final)
    candidates: list[dict] = field(default_factory=list)  # SAG only
    vote: dict = field(default_factory=dict)  # SAG only


@dataclass
class Episode:
    """A finished episode: ``messages`` is the exact conversation, ready to replay for training."""

    question_id: str
    sample_index: int
    question: str
    prediction: str | None
    steps: list[StepRecord]
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    error: str | None
    messages: list[dict[str, str]]
    prefix: str | None

    @property
    def num_steps(self) -> int:
        """Actions taken, the finalising one included."""
        return len(self.steps)


def stable_seed(*parts: object) -> int:
    """A seed in [0, 2**31) from ``parts``, identical across processes (unlike ``hash()``)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**31)


def run_agent(
    tasks: list[AgentTask],
    generator: Generator,
    sandbox: Sandbox,
    cfg: AgentConfig,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Episode]:
    """Run every task as a CodeAct episode; returns one Episode per task, in order.

    ``on_progress(finished, total)`` is called after every step. Generation errors propagate; action
    failures (parse, execution, timeout, ...) become observations and the episode goes on.
    """
    _check_tasks(tasks)
    episodes = [_new_episode(task, cfg) for task in tasks]
    states = [sandbox.new_state() for _ in tasks]
    finished = [False] * len(tasks)
    for step in range(1, cfg.max_steps + 2):
        active = [i for i in range(len(tasks)) if not finished[i]]
        if not active:
            break
        if step > cfg.max_steps:  # the finalising call: ask for the answer one last time
            for i in active:
                episodes[i].messages.append(finalize_message())
        prefixes = [_assistant_prefix(tasks[i], step) for i in active]
        candidates = _sample_actions([episodes[i] for i in active], prefixes, generator, cfg, step)
        _execute(candidates, [states[i] for i in active], sandbox)
        for i, episode_candidates in zip(active, candidates):
            states[i] = _keep_step(episodes[i], episode_candidates, step, cfg)
            finished[i] = episodes[i].steps[-1].is_final
        if on_progress is not None:
            on_progress(sum(finished), len(tasks))
    for episode, done in zip(episodes, finished):
        if not done:
            episode.error = MAX_STEPS_ERROR
    return episodes


def _check_tasks(tasks: list[AgentTask]) -> None:
    seen: set[tuple[str, int]] = set()
    for task in tasks:
        key = (task.question_id, task.sample_index)
        if key in seen:
            raise ValueError(f"duplicate task: question {task.question_id!r} sample {task.sample_index}")
        if not task.question.strip():
            raise ValueError(f"question {task.question_id!r} is empty")
        seen.add(key)


def _new_episode(task: AgentTask, cfg: AgentConfig) -> Episode:
    messages = [{"role": "system", "content": system_prompt(cfg.prompt)}, question_message(task.question)]
    return Episode(
        question_id=task.question_id,
        sample_index=task.sample_index,
        question=task.question,
        prediction=None,
        steps=[],
        prompt_tokens=0,
        completion_tokens=0,
        latency_s=0.0,
        error=None,
        messages=messages,
        prefix=task.prefix,
    )


def _assistant_prefix(task: AgentTask, step: int) -> str:
    """The forced start of this step's assistant message: the FTP thought on step 1, else nothing."""
    return thought_prefix(task.prefix) if step == 1 and task.prefix else ""


def _sample_actions(
    episodes: list[Episode], prefixes: list[str], generator: Generator, cfg: AgentConfig, step: int
) -> list[list[Candidate]]:
    """One batched backend call for all ``episodes``; returns their parsed (not yet run) candidates."""
    sampling = _sampling(cfg)
    requests = [
        Request(
            messages=ep.messages + ([{"role": "assistant", "content": prefix}] if prefix else []),
            continue_final=bool(prefix),
            seed=stable_seed(cfg.seed, ep.question_id, ep.sample_index, step),
            label=f"question {ep.question_id} sample {ep.sample_index} step {step}",
        )
        for ep, prefix in zip(episodes, prefixes)
    ]
    generations = generator.generate(requests, sampling)
    _check_generations(generations, len(requests), sampling.n, generator)
    return [
        [_parsed_candidate(prefix, completion, cfg.boxed_answer) for completion in generation.completions]
        for generation, prefix in zip(generations, prefixes)
    ]


def _sampling(cfg: AgentConfig) -> Sampling:
    if cfg.sag.enabled:
        return Sampling(
            n=cfg.sag.n, temperature=cfg.sag.temperature, top_p=cfg.sag.top_p,
            max_new_tokens=cfg.max_new_tokens, stop=STOP_SEQUENCES, seed=cfg.seed,
        )
    return Sampling(
        n=1, temperature=cfg.temperature, top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens, stop=STOP_SEQUENCES, seed=cfg.seed,
    )


def _check_generations(generations: list[Generation], num_requests: int, n: int, generator: Generator) -> None:
    if len(generations) != num_requests:
        raise GenerationError(
            f"backend {generator.name!r} returned {len(generations)} generations for {num_requests} requests"
        )
    for i, generation in enumerate(generations):
        if len(generation.completions) != n:
            raise GenerationError(
                f"backend {generator.name!r} returned {len(generation.completions)} completions "
                f"for request {i}, expected n={n}"
            )


def _parsed_candidate(prefix: str, completion: Completion, boxed_answer: bool) -> Candidate:
    """Parse ``prefix + completion``; the state and result are filled in by ``_execute``.

    With ``boxed_answer``, an action without code that gives a ``\\boxed{}`` answer is final as it is
    (nothing runs); every other action without code is a parse failure.
    """
    text = prefix + completion.text
    action = parse_action(text)
    if boxed_answer and action.answer is not None:
        answered = ExecResult(observation="", is_final=True, final_answer=action.answer)
        return Candidate(assistant=text, action=action, completion=completion, result=answered, state=None)
    assistant = _assistant_message(text, completion, parsed=action.code is not None)
    failure = ExecResult(observation=action.error or "", error_kind="parse", error=action.error)
    return Candidate(assistant=assistant, action=action, completion=completion, result=failure, state=None)


def _assistant_message(text: str, completion: Completion, parsed: bool) -> str:
    """The generated text as it is stored and replayed: a finished action ends with ``<end_code>``.

    The backend strips the stop string, so put ``<end_code>`` back when it ended generation; when the
    model ended its action otherwise (at a hallucinated ``Observation:``, at EOS) normalise the end to
    the same terminator so training sees one format. Unparseable text, and text cut by the token limit
    (the model did not finish; its code may be cut too), are kept exactly as generated.
    """
    if completion.stop == END_CODE:
        return text + END_CODE
    if parsed and completion.finish_reason != "length":
        return text.rstrip() + END_CODE
    return text


def _execute(candidates: list[list[Candidate]], states: list[EpisodeState], sandbox: Sandbox) -> None:
    """Run every parsed candidate, of every episode, in ONE parallel sandbox batch (in place)."""
    jobs: list[tuple[EpisodeState, str]] = []
    runnable: list[Candidate] = []
    for episode_candidates, state in zip(candidates, states):
        for candidate in episode_candidates:
            candidate.state = state  # parse failures keep the episode's state unchanged
            if candidate.action.code is not None:
                jobs.append((state, candidate.action.code))
                runnable.append(candidate)
    if not jobs:
        return
    for candidate, (result, new_state) in zip(runnable, sandbox.run(jobs), strict=True):
        candidate.result = result
        candidate.state = new_state


def _keep_step(episode: Episode, candidates: list[Candidate], step: int, cfg: AgentConfig) -> EpisodeState:
    """Append the winning action to ``episode`` (record + messages); return the state to continue from."""
    outcome = vote(candidates)
    winner = candidates[outcome.winner]
    result = winner.result
    is_final = result.is_final and not winner.failed
    fed_back = not is_final and step <= cfg.max_steps  # nothing follows the finalising action
    feedback = observation_message(result.observation)["content"] if fed_back else ""
    record = StepRecord(
        step=step,
        thought=winner.action.thought,
        code=winner.action.code,
        observation=result.observation,
        error_kind=result.error_kind,
        tool_calls=result.tool_calls,
        prompt_tokens=winner.completion.prompt_tokens,
        completion_tokens=sum(c.completion.completion_tokens for c in candidates),
        latency_s=sum(c.completion.latency_s for c in candidates) + result.duration_s,
        is_final=is_final,
        assistant=winner.assistant,
        observation_message=feedback,
        candidates=candidate_records(candidates, outcome) if cfg.sag.enabled else [],
        vote=vote_record(outcome) if cfg.sag.enabled else {},
    )
    episode.steps.append(record)
    episode.prompt_tokens += record.prompt_tokens
    episode.completion_tokens += record.completion_tokens
    episode.latency_s += record.latency_s
    episode.messages.append({"role": "assistant", "content": record.assistant})
    if is_final:
        episode.prediction = result.final_answer
    if fed_back:
        episode.messages.append({"role": "user", "content": feedback})
    return winner.state
