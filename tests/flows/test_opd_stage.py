"""The ``opd`` stage end to end on a tiny scale: a scripted teacher's rollouts train the agent-distilled tiny
student; two on-policy iterations sample the student's episodes (scripted actions through the real engine,
sandbox and FAISS index), score every token with a real transformers teacher, update the real LoRA adapter,
and the evaluation runs ``agent-opd`` beside ``agent-distilled``. A SIGKILLed iteration resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from flows_fixtures import CORPUS

from agent_runtime.backends.scripted import ScriptedGenerator
from flows.config import PipelineConfig
from storage.catalog import query
from storage.store import ArtifactStore

QUESTIONS = {"What is 2 + 3?": "5", "What is 7 * 6?": "42", "Which planet is known as the Red Planet?": "Mars"}


def scripted_agent(request, sample_index):
    """Step 1 searches, step 2 answers (the rollout's teacher and the sampled student alike)."""
    question = request.messages[1]["content"].removeprefix("Task: ").strip()
    if not any(m["role"] == "assistant" for m in request.messages):
        return f"Thought: I look it up first.\nCode:\n```py\nprint(web_search({question!r}))\n```<end_code>"
    return f"Thought: I know it now.\nCode:\n```py\nfinal_answer({QUESTIONS[question]!r})\n```<end_code>"


def opd_config(tmp_path: Path, tiny_student: Path) -> PipelineConfig:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "corpus.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in CORPUS))
    lines = [json.dumps({"id": f"q{i}", "question": q, "answer": a}) for i, (q, a) in enumerate(QUESTIONS.items())]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    datasets = [{"name": "mixed", "source": str(data / "train.jsonl"), "kind": "qa"}]
    return PipelineConfig.model_validate({
        "index": {"corpus": {"source": str(data / "corpus.jsonl")}},
        "sandbox": {"workers": 1},
        "teacher": {"kind": "scripted", "model": "scripted-teacher"},
        "student": {"kind": "scripted", "model": str(tiny_student)},
        "rollout": {"datasets": datasets, "num_parts": 1, "use_prefixes": False, "agent": {"max_steps": 2}},
        "train": {"base_model": str(tiny_student), "epochs": 1, "per_device_batch_size": 2, "grad_accum": 1,
                  "lora": {"r": 4, "alpha": 8}, "max_length": 1024},
        "opd": {"iterations": 2, "samples_per_question": 2, "episodes_per_step": 2, "learning_rate": 1e-3,
                # One step, then the engine's finalising call: the observation and the "write the final answer"
                # instruction come as two user messages before the answer (the study's longest episodes).
                "agent": {"prompt": "student", "temperature": 0.7, "max_steps": 1, "max_new_tokens": 64},
                "scorer": {"kind": "transformers", "model": str(tiny_student), "dtype": "float32"}},
        "evaluate": {"datasets": datasets, "num_shards": 1, "agent": {"max_steps": 2},
                     "methods": [{"name": "agent-distilled", "model": "agent_student"},
                                 {"name": "agent-opd", "model": "opd_student"},
                                 {"name": "agent-opd+sag", "model": "opd_student", "sag": True}]},
    })


def script_models(monkeypatch) -> None:
    """The teacher's rollouts and the student's actions come from ``scripted_agent``; the scorer is real."""
    import tasks.opd
    import tasks.rollout
    import tasks.shard_worker

    generator = ScriptedGenerator(scripted_agent)
    real = tasks.opd.generator_for
    monkeypatch.setattr(tasks.rollout, "generator_for", lambda cfg: nullcontext(generator))
    monkeypatch.setattr(tasks.shard_worker, "generator_for", lambda cfg: nullcontext(generator))
    monkeypatch.setattr(tasks.opd, "generator_for",
                        lambda cfg: nullcontext(generator) if cfg.kind == "scripted" else real(cfg))


def test_two_iterations_score_every_student_token_and_the_evaluation_runs_agent_opd(
        tmp_path, tiny_student, home, prefect_harness, monkeypatch):
    from flows.pipeline import pipeline_flow

    script_models(monkeypatch)
    cfg = opd_config(tmp_path, tiny_student)
    results = pipeline_flow(cfg=cfg, home=str(home))
    store = ArtifactStore(home)
    opd = {m["config"]["iteration"]: m for m in store.list() if m["stage"] == "opd"}
    assert sorted(opd) == [1, 2]
    adapters = {m["id"]: m for m in store.list() if m["stage"] == "train"}
    (agent_adapter,) = adapters
    # The chain: opd/1 starts from the agent-distilled adapter, opd/2 from opd/1; the evaluation reads opd/2.
    assert agent_adapter in opd[1]["parents"] and opd[1]["id"] in opd[2]["parents"]
    assert opd[2]["id"] in store.manifest(results["evaluation"])["parents"]
    for manifest in opd.values():
        assert manifest["row_counts"]["opd_episodes"] == 3 * 2  # 3 questions × 2 samples
        assert (Path(store.resolve(manifest["id"]).path) / "adapter" / "adapter_model.safetensors").is_file()
        assert (Path(store.resolve(manifest["id"]).path) / "kl.png").is_file()
    # Every token of every assistant turn is scored, and only those: two turns per episode, each turn's
    # positions 0..n-1 and its tokens the turn's text tokenized alone.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    _, rows = query(home, "select t.question_id, t.sample_index, e.messages_json, t.step, list(t.token_id order by t.position), "
                          "list(t.position order by t.position), list(distinct t.segment) from opd_tokens t "
                          "join opd_episodes e using (artifact_id, dataset, question_id, sample_index) "
                          f"where t.artifact_id = '{opd[1]['id']}' group by all")
    assert len(rows) == 6 * 2
    for _, _, messages_json, step, token_ids, positions, segments in rows:
        roles = [m["role"] for m in json.loads(messages_json)]
        assert roles[:6] == ["system", "user", "assistant", "user", "user", "assistant"]
        turns = [m["content"] for m in json.loads(messages_json) if m["role"] == "assistant"]
        assert token_ids == tokenizer(turns[step - 1], add_special_tokens=False).input_ids
        assert positions == list(range(len(token_ids)))
        # every scripted action ends with the <end_code> marker: its tokens are the segment "stop"
        assert set(segments) == ({"final", "stop"} if step == 2 else {"thought", "code", "stop"})
    _, kl = query(home, "select iteration, sum(tokens), sum(kl * tokens) / sum(tokens) from token_kl "
                        "group by all order by iteration")
    assert [row[0] for row in kl] == [1, 2] and all(row[1] > 0 for row in kl)
    _, losses = query(home, "select iteration, count(*) from opd_losses group by all order by all")
    assert losses == [(1, 3), (2, 3)]  # 6 episodes, 2 per optimizer step
    _, methods = query(home, "select method, adapter, n from metrics order by method")
    assert [(m, n) for m, _, n in methods] == [("agent-distilled", 3), ("agent-opd", 3), ("agent-opd+sag", 3)]
    assert methods[1][1] == opd[2]["id"] and methods[0][1] == agent_adapter


DRIVER = """
import sys, time, json
sys.path[:0] = {paths!r}
from pathlib import Path
from test_opd_stage import opd_config, script_models
import pytest
import training.opd, tasks.opd
from flows.plans import build_missing, plan_pipeline
from storage.store import ArtifactStore

class Patch:
    def setattr(self, target, name, value):
        setattr(target, name, value)

script_models(Patch())
slow = training.opd.train_iteration
def slowly(*args, **kwargs):
    if {slow_update!r}:
        time.sleep(600)  # the test kills the process here
    return slow(*args, **kwargs)
tasks.opd.train_iteration = slowly
cfg = opd_config(Path({tmp!r}), Path({student!r})).model_copy(update={{"opd": opd_config(Path({tmp!r}), Path({student!r})).opd.model_copy(update={{"iterations": 1}})}})
plan = plan_pipeline(ArtifactStore({home!r}), cfg, ("opd",))
build_missing(plan, cfg)
print("BUILT", plan.ref("opd/1").id)
"""


def test_a_sigkilled_iteration_resumes_from_its_scored_tokens(tmp_path, tiny_student, home, monkeypatch):
    """Killed during the update (after sampling and scoring), the same command finishes the same artifact id,
    re-using the episodes and token scores it had written."""
    from flows.plans import build_missing, plan_pipeline

    script_models(monkeypatch)
    cfg = opd_config(tmp_path, tiny_student)
    store = ArtifactStore(home)
    build_missing(plan_pipeline(store, cfg, ("train",)), cfg)  # the start adapter, in this process

    def driver(slow_update: bool) -> subprocess.Popen:
        here = Path(__file__).resolve()
        code = DRIVER.format(paths=[str(here.parent), str(here.parents[2])], slow_update=slow_update,
                             tmp=str(tmp_path), student=str(tiny_student), home=str(home))
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True, env={**os.environ, "PREFECT_LOGGING_LEVEL": "ERROR"})

    first = driver(slow_update=True)
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None and not list(home.glob("opd/*/opd_tokens.parquet")):
        time.sleep(0.2)
    tokens = next(home.glob("opd/*/opd_tokens.parquet"), None)
    assert tokens is not None, f"no token scores written before the deadline:\n{first.stdout.read() if first.poll() is not None else ''}"
    time.sleep(1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    written = {p: p.stat().st_mtime_ns for p in tokens.parent.rglob("*.parquet")}
    assert not (tokens.parent / "manifest.json").exists() and not (tokens.parent / "adapter").exists()

    again = driver(slow_update=False)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output
    built = output.split("BUILT ")[1].split()[0]
    assert built == tokens.parent.name  # the same artifact id
    for path, mtime in written.items():  # episodes and scores were not redone
        assert path.stat().st_mtime_ns == mtime
    manifest = store.manifest(store.resolve(built))
    assert manifest["row_counts"]["opd_tokens"] > 0 and (tokens.parent / "adapter" / "adapter_config.json").is_file()
