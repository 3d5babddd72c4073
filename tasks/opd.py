"""Prefect task of the ``opd`` stage: one on-policy distillation iteration (``training.opd``) per artifact.

``opd/k`` reads the adapter of ``opd/k-1`` (``opd/1`` the agent-distilled student's, ``train/agent``) and the
index, and writes, in three resumable phases (a killed run keeps every finished phase and part):

1. ``opd_episodes/``, ``opd_steps/``: the student's episodes on the training questions, one part per dataset,
   sampled with the student backend (``student``, with the adapter) at ``opd.agent``'s temperature;
2. ``opd_tokens.parquet``: every token the student generated, with its log-prob under the teacher (scored
   in the student's own context by ``opd.scorer``, or with the teacher's system prompt in place of the
   student's: ``opd.scorer_prompt``) and under the sampling adapter;
3. ``adapter/``, ``opd_losses.parquet``, ``kl.png``: the adapter after the reverse-KL update.

The artifact id hashes ``opd`` (but not ``iterations``), the iteration, the student and teacher settings,
the sandbox and search settings and the datasets, so raising ``iterations`` re-uses the iterations built.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import TYPE_CHECKING

import pyarrow as pa
from prefect import task

from agent_runtime.generation import Request
from agent_runtime.prompts import system_prompt
from agent_runtime.rollout import run_questions
from agent_runtime.sandbox import Sandbox
from common.files import atomic_dir
from evaluation.grading import grade
from questions.datasets import load_dataset
from storage.catalog import read_table
from storage.schemas import OPD_EPISODES, OPD_LOSSES, OPD_STEPS, OPD_TOKENS
from storage.store import Artifact, ArtifactRef, StagePlan, atomic_write_table, part_name
from tasks.artifacts import Written, build_artifact
from tasks.progress import Progress
from tasks.resources import generator_for, search_for
from tasks.retries import TRANSIENT_RETRIES
from training.examples import ExampleError, TemplateError
from training.opd import (
    OpdExample,
    align_turns,
    fill_old_logprobs,
    load_student,
    opd_example,
    train_iteration,
)

if TYPE_CHECKING:
    from flows.config import PipelineConfig
    from flows.stages import StageOptions


@task(name="opd", task_run_name="opd-{kind}", **TRANSIENT_RETRIES)
def build(plan: StagePlan, cfg: PipelineConfig, inputs: dict[str, ArtifactRef], kind: str,
          options: StageOptions) -> ArtifactRef:
    """Iteration ``kind`` (1, 2, …) of on-policy distillation (see the module docstring)."""
    iteration = int(kind)
    start = inputs["train/agent"] if iteration == 1 else inputs[f"opd/{iteration - 1}"]

    def write(artifact: Artifact) -> Written:
        sample_episodes(artifact, cfg, iteration, start, inputs["index"])
        if not (artifact.path / "opd_tokens.parquet").is_file():
            score_tokens(artifact, cfg, iteration, start)
        if not (artifact.path / "adapter" / "adapter_config.json").is_file():
            update_adapter(artifact, cfg, iteration, start)
        return summarize(artifact, iteration, start)

    return build_artifact(plan, write, "select dataset, segment, sum(tokens), round(sum(kl * tokens) / sum(tokens), 4) "
                                       "from token_kl where artifact_id = '{id}' group by all order by all")


# ----------------------------------------------------------------------------- 1. the student's episodes

def sample_episodes(artifact: Artifact, cfg: PipelineConfig, iteration: int, start: ArtifactRef,
                    index: ArtifactRef) -> None:
    """The student's episodes of each dataset whose part is not written yet."""
    work = [(n, d, load_dataset(d)) for n, d in enumerate(cfg.opd_datasets())
            if not (artifact.path / "opd_episodes" / part_name(n)).is_file()]
    if not work:
        return
    opd = cfg.opd
    agent = opd.agent.model_copy(update={"seed": opd.agent.seed + 1000 * iteration})  # fresh samples each time
    student = cfg.student.model_copy(update={"adapter": str(start.path / "adapter")})
    search = search_for(index, cfg.index, cfg.search)
    progress = Progress(sum(len(qs) for *_, qs in work) * opd.samples_per_question, f"opd {iteration}: student episodes")
    done = 0
    labels = {"artifact_id": artifact.ref.id, "model": cfg.student.model, "method": f"opd-{iteration}",
              "iteration": iteration}
    with generator_for(student) as generator, Sandbox(cfg.sandbox, search=search) as sandbox:
        for part, dataset, questions in work:
            rows = run_questions(questions, dataset.kind, generator, sandbox, agent, grade,
                                 opd.samples_per_question, None, labels,
                                 on_progress=lambda finished, _total, base=done: progress.update(base + finished))
            steps = [{**row, "artifact_id": artifact.ref.id, "iteration": iteration} for row in rows.steps]
            artifact.write_table("opd_steps", pa.Table.from_pylist(steps, schema=OPD_STEPS), OPD_STEPS, part=part)
            artifact.write_table("opd_episodes", pa.Table.from_pylist(rows.episodes, schema=OPD_EPISODES),
                                 OPD_EPISODES, part=part)
            done += len(rows.episodes)
    progress.close()


# ----------------------------------------------------------------------------- 2. teacher and student log-probs

SCORE_CHUNK = 32  # assistant turns per score call (the backend batches within it): progress granularity

def turn_requests(messages: list[dict], system: str | None = None) -> list[tuple[Request, str]]:
    """(the context, the text) of every assistant turn of an episode: what the student saw and wrote; with
    ``system``, that system message in place of the student's (the rest of the context unchanged)."""
    if system is not None:
        if not messages or messages[0].get("role") != "system":
            raise ExampleError("the episode does not start with a system message to replace")
        messages = [{"role": "system", "content": system}, *messages[1:]]
    return [(Request(messages[:i]), m["content"]) for i, m in enumerate(messages) if m["role"] == "assistant"]


def score_tokens(artifact: Artifact, cfg: PipelineConfig, iteration: int, start: ArtifactRef) -> None:
    """Score every student token by the teacher, then by the sampling adapter; write ``opd_tokens.parquet``."""
    episodes = read_table(artifact.path, "opd_episodes")
    finals = final_turns(read_table(artifact.path, "opd_steps"))
    conversations = [(key, json.loads(m)) for key, m in zip(episode_keys(episodes),
                                                             episodes.column("messages_json").to_pylist())]
    system = system_prompt("teacher") if cfg.opd.scorer_prompt == "teacher" else None
    pairs = [(key, request, text) for key, messages in conversations
             for request, text in turn_requests(messages, system)]
    # Similar lengths together: a scoring batch is padded to its longest row.
    order = sorted(range(len(pairs)), key=lambda i: len(str(pairs[i][1].messages)) + len(pairs[i][2]))
    progress = Progress(len(pairs), f"opd {iteration}: teacher scores")
    scored: list = [None] * len(pairs)
    with generator_for(cfg.opd_scorer()) as teacher:
        for begin in range(0, len(order), SCORE_CHUNK):
            chunk = order[begin:begin + SCORE_CHUNK]
            for i, result in zip(chunk, teacher.score([pairs[i][1] for i in chunk], [pairs[i][2] for i in chunk])):
                scored[i] = result
            progress.update(begin + len(chunk))
    progress.close()
    by_episode = defaultdict(list)
    for (key, _, _), result in zip(pairs, scored):
        by_episode[key].append(result)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_student(cfg.train.base_model, start.path / "adapter", device)
    examples = []
    for key, messages in conversations:
        example = episode_example(tokenizer, key, messages, by_episode[key], finals.get(key, {}), cfg.opd.max_length)
        if example is not None:
            examples.append(example)
    progress = Progress(len(examples), f"opd {iteration}: student log-probs")
    fill_old_logprobs(model, examples, device, on_progress=progress.update, precision=cfg.train.precision)
    progress.close()
    atomic_write_table(artifact.path / "opd_tokens.parquet", tokens_table(examples, artifact.ref.id, iteration),
                       OPD_TOKENS)


def episode_keys(episodes: pa.Table) -> list[tuple[str, str, int]]:
    return list(zip(*(episodes.column(c).to_pylist() for c in ("dataset", "question_id", "sample_index"))))


def final_turns(steps: pa.Table) -> dict[tuple, dict[int, bool]]:
    """(dataset, question id, sample) → {step: is_final}."""
    out: dict[tuple, dict[int, bool]] = defaultdict(dict)
    columns = ("dataset", "question_id", "sample_index", "step", "is_final")
    for dataset, qid, sample, step, final in zip(*(steps.column(c).to_pylist() for c in columns)):
        out[(dataset, qid, sample)][step] = bool(final)
    return out


def episode_example(tokenizer, key, messages, scored, finals: dict[int, bool], max_length: int) -> OpdExample | None:
    """One episode's example with the teacher's log-probs; None (and a warning naming it) when it cannot
    be aligned (a chat template that re-renders history, a tokenizer that differs from the teacher's)."""
    flags = [finals.get(j + 1, False) for j in range(len(scored))]
    try:
        full, turns = align_turns(tokenizer, messages, [s.token_ids for s in scored], flags)
    except (ExampleError, TemplateError) as exc:
        print(f"warning: opd: episode {key} is left out: {exc}", file=sys.stderr)
        return None
    return opd_example(key, full, turns, [s.logprobs for s in scored], max_length)


def tokens_table(examples: list[OpdExample], artifact_id: str, iteration: int) -> pa.Table:
    rows = []
    for example in examples:
        dataset, qid, sample = example.key
        position, previous = 0, None
        for k, pos in enumerate(example.positions):
            position = 0 if example.steps[k] != previous else position + 1
            previous = example.steps[k]
            rows.append({"artifact_id": artifact_id, "iteration": iteration, "dataset": dataset, "question_id": qid,
                         "sample_index": sample, "step": example.steps[k], "segment": example.segments[k],
                         "position": position, "token_id": example.input_ids[pos],
                         "teacher_logprob": example.teacher[k], "student_logprob": example.old[k]})
    return pa.Table.from_pylist(rows, schema=OPD_TOKENS)


def stored_examples(artifact: Artifact, tokenizer, max_length: int) -> list[OpdExample]:
    """The examples of ``opd_tokens.parquet`` again (re-aligned on the stored episodes)."""
    episodes = read_table(artifact.path, "opd_episodes")
    tokens = read_table(artifact.path, "opd_tokens").to_pylist()
    finals = final_turns(read_table(artifact.path, "opd_steps"))
    by_episode: dict[tuple, list[dict]] = defaultdict(list)
    for row in tokens:
        by_episode[(row["dataset"], row["question_id"], row["sample_index"])].append(row)
    examples = []
    for key, messages_json in zip(episode_keys(episodes), episodes.column("messages_json").to_pylist()):
        rows = by_episode.get(key)
        if not rows:
            continue
        messages = json.loads(messages_json)
        turns = defaultdict(list)
        for row in rows:
            turns[row["step"]].append(row)
        if sorted(turns) != list(range(1, len(turns) + 1)):  # a turn without tokens: the turns cannot be matched
            print(f"warning: opd: episode {key} is left out: a turn has no scored tokens", file=sys.stderr)
            continue
        scored_ids = [[r["token_id"] for r in turns[step]] for step in sorted(turns)]
        full, aligned = align_turns(tokenizer, messages[: assistant_index(messages, len(scored_ids)) + 1],
                                    scored_ids, [finals[key].get(step, False) for step in sorted(turns)])
        example = opd_example(key, full, aligned, [[r["teacher_logprob"] for r in turns[s]] for s in sorted(turns)],
                              max_length)
        example.old = [r["student_logprob"] for step in sorted(turns) for r in turns[step]]
        examples.append(example)
    return examples


def assistant_index(messages: list[dict], count: int) -> int:
    """The index of the ``count``-th assistant message (the last one an example kept)."""
    seen = 0
    for index, message in enumerate(messages):
        seen += message["role"] == "assistant"
        if seen == count:
            return index
    raise ExampleError(f"the episode has fewer than {count} assistant turns")


# ----------------------------------------------------------------------------- 3. the update

def update_adapter(artifact: Artifact, cfg: PipelineConfig, iteration: int, start: ArtifactRef) -> None:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_student(cfg.train.base_model, start.path / "adapter", device)
    examples = stored_examples(artifact, tokenizer, cfg.opd.max_length)
    if not examples:
        raise ExampleError(f"opd iteration {iteration}: no student episode could be scored ({artifact.path})")
    steps = -(-len(examples) * cfg.opd.epochs // cfg.opd.episodes_per_step)
    progress = Progress(steps, f"opd {iteration}: reverse-KL update")
    rows = train_iteration(model, examples, cfg.opd, iteration, device, on_step=lambda step, _n: progress.update(step),
                           precision=cfg.train.precision)
    progress.close()
    atomic_write_table(artifact.path / "opd_losses.parquet", pa.Table.from_pylist(rows, schema=OPD_LOSSES), OPD_LOSSES)
    plot_kl(rows, artifact.path / "kl.png")
    with atomic_dir(artifact.path / "adapter") as temporary:
        model.save_pretrained(temporary, safe_serialization=True, save_embedding_layers=False)


def plot_kl(rows: list[dict], path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from common.files import atomic_file

    figure = Figure(figsize=(6, 3.5), layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.plot([r["step"] for r in rows], [r["kl"] for r in rows], marker=".")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("reverse KL to the teacher (nats/token)")
    axes.set_title(f"on-policy distillation, iteration {rows[0]['iteration'] if rows else ''}")
    axes.grid(alpha=0.3)
    with atomic_file(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=100)


def summarize(artifact: Artifact, iteration: int, start: ArtifactRef) -> Written:
    episodes = read_table(artifact.path, "opd_episodes")
    tokens = read_table(artifact.path, "opd_tokens")
    losses = read_table(artifact.path, "opd_losses")
    correct = [c for c in episodes.column("correct").to_pylist() if c is not None]
    kl = [s - t for s, t in zip(tokens.column("student_logprob").to_pylist(), tokens.column("teacher_logprob").to_pylist())]
    metrics = {"iteration": iteration, "start_adapter": start.id, "episodes": episodes.num_rows,
               "accuracy": sum(correct) / len(correct) if correct else None,
               "episodes_scored": len(set(zip(*(tokens.column(c).to_pylist()
                                                for c in ("dataset", "question_id", "sample_index"))))),
               "teacher_tokens_scored": tokens.num_rows, "kl_start": sum(kl) / len(kl) if kl else None,
               "steps": losses.num_rows, "update_s": sum(losses.column("step_time_s").to_pylist())}
    return {"opd_episodes": episodes.num_rows, "opd_steps": read_table(artifact.path, "opd_steps").num_rows,
            "opd_tokens": tokens.num_rows, "opd_losses": losses.num_rows}, metrics
