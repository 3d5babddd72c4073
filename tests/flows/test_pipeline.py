"""The whole pipeline end to end on a tiny scale: scripted teacher, tiny random student, real everything else.

Real parts: Prefect's engine (test harness), the artifact store and DuckDB catalog, a FAISS index over a
5-document corpus embedded by MiniLM, the subprocess sandbox, LoRA training with peft + accelerate on a
2-layer random Llama, sharded evaluation, metrics and report. Only the generator is scripted: it answers
by looking the question up, after one web_search step.
"""

import json
from contextlib import nullcontext
from datetime import UTC, datetime

import pytest
from flows_fixtures import CORPUS

from agent_runtime.backends.scripted import ScriptedGenerator
from agent_runtime.prompts import COT_SYSTEM_PROMPT
from flows.config import PipelineConfig
from storage.catalog import query
from storage.store import ArtifactStore

MATH = {"What is 2 + 3?": "5", "What is 7 * 6?": "42", "What is 10 - 4?": "6", "What is 9 + 9?": "18"}
FACTS = {"Which planet is known as the Red Planet?": "Mars", "What is the capital of France?": "Paris"}
ANSWERS = {**MATH, **FACTS}


def scripted_model(request, sample_index):
    """CoT: a boxed answer. Agent: step 1 searches, step 2 answers."""
    if request.messages[0]["content"] == COT_SYSTEM_PROMPT:
        question = request.messages[1]["content"]
        return f"Read the question carefully.\n\nThe final answer is \\boxed{{{ANSWERS[question]}}}."
    question = request.messages[1]["content"].removeprefix("Task: ").strip()
    taken = sum(m["role"] == "assistant" for m in request.messages) - int(request.continue_final)
    if taken == 0:  # the first action; with FTP it continues the forced first thought
        thought = " So I look it up first." if request.continue_final else "Thought: I look it up first."
        return f"{thought}\nCode:\n```py\nprint(web_search({question!r}))\n```<end_code>"
    return f"Thought: I know it now.\nCode:\n```py\nfinal_answer({ANSWERS[question]!r})\n```<end_code>"


@pytest.fixture
def tiny_setup(tmp_path, tiny_student, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in CORPUS))
    for name, answers in (("math", MATH), ("facts", FACTS)):
        lines = [json.dumps({"id": f"{name}-{i}", "question": q, "answer": a}) for i, (q, a) in
                 enumerate(answers.items())]
        (data / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    generator = ScriptedGenerator(scripted_model)
    import tasks.prefixes
    import tasks.rollout
    import tasks.shard_worker

    for module in (tasks.rollout, tasks.prefixes, tasks.shard_worker):
        monkeypatch.setattr(module, "generator_for", lambda cfg: nullcontext(generator))
    student = {"kind": "scripted", "model": str(tiny_student)}
    datasets = [{"name": "math", "source": str(data / "math.jsonl"), "kind": "math"},
                {"name": "facts", "source": str(data / "facts.jsonl"), "kind": "qa"}]
    cfg = PipelineConfig.model_validate({
        "index": {"corpus": {"source": str(data / "corpus.jsonl")}},
        "sandbox": {"workers": 2},
        "teacher": {"kind": "scripted", "model": "scripted-teacher"},
        "student": student,
        "rollout": {"datasets": datasets, "num_parts": 2, "use_prefixes": True, "agent": {"max_steps": 3}},
        "train": {"base_model": str(tiny_student), "epochs": 1, "per_device_batch_size": 2, "grad_accum": 1,
                  "lora": {"r": 4, "alpha": 8}, "max_length": 1024},
        "cot_student": {"enabled": True, "train": {"base_model": str(tiny_student), "epochs": 1,
                                                     "lora": {"r": 4, "alpha": 8}, "max_length": 1024}},
        "evaluate": {"datasets": datasets, "num_shards": 2, "agent": {"max_steps": 3},
                     "methods": [{"name": "cot", "model": "student", "mode": "cot"},
                                 {"name": "agent", "model": "student", "prompt": "teacher"},
                                 {"name": "agent-distilled", "model": "agent_student"},
                                 {"name": "agent-distilled+sag", "model": "agent_student", "sag": True},
                                 {"name": "cot-distilled", "model": "cot_student", "mode": "cot"}]},
    })
    return cfg, generator


STAGE_FLOWS = ("index", "prefixes", "rollout", "sft", "train", "evaluate")


def stage_flow_runs(since) -> dict[str, int]:
    """How many runs of each stage flow Prefect recorded since ``since`` (the harness's API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)))
        names = {flow.id: flow.name for flow in client.read_flows()}
    started = [names[run.flow_id] for run in runs]
    return {name: started.count(name) for name in STAGE_FLOWS}


def stage_task_runs(since) -> dict[str, int]:
    """How many runs of each stage's task (not the evaluation's report task) Prefect recorded since ``since``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(after_=since)))
    started = [run.name.split("-")[0] for run in runs]  # "<task name>-<suffix>", "train-agent"
    return {name: started.count(name) for name in STAGE_FLOWS if name != "evaluate" and name in started}


def test_pipeline_runs_every_stage_with_lineage_and_reuses_them(tiny_setup, home, prefect_harness):
    from flows.pipeline import pipeline_flow
    from flows.plans import cached_pipeline

    cfg, generator = tiny_setup
    assert cached_pipeline(ArtifactStore(home), cfg) is None  # nothing built yet
    started = datetime.now(UTC)
    results = pipeline_flow(cfg=cfg, home=str(home))
    assert stage_flow_runs(started) == dict.fromkeys(STAGE_FLOWS, 1)  # each stage flow once, in the pipeline
    store = ArtifactStore(home)
    stages = {m["stage"]: m for m in store.list()}
    assert set(stages) == {"index", "prefixes", "rollout", "sft", "train", "evaluate"}
    by_id = {m["id"]: m for m in store.list()}
    # Lineage: evaluate ← index + train; train ← sft ← rollout ← index + prefixes.
    evaluation = store.manifest(results["evaluation"])
    parent_stages = sorted(by_id[p]["stage"] for p in evaluation["parents"])
    assert parent_stages == ["index", "train", "train"]
    trajectories = stages["rollout"]
    assert sorted(by_id[p]["stage"] for p in trajectories["parents"]) == ["index", "prefixes"]
    agent_adapter = store.manifest(results["adapter_agent"])
    data = by_id[agent_adapter["parents"][0]]
    assert data["stage"] == "sft" and data["parents"] == [trajectories["id"]]
    assert (store.root / "train" / agent_adapter["id"] / "adapter" / "adapter_model.safetensors").is_file()

    # Rollouts: every question once, all correct (the script knows the answers), FTP prefix used.
    rows = query(home, "select dataset, count(*), sum(correct::int) from episodes group by 1 order by 1")[1]
    assert rows == [("facts", 2, 2), ("math", 4, 4)]
    prefixes = query(home, "select count(*) from episodes where prefix like 'Read the question%'")[1]
    assert prefixes == [(6,)]
    assert query(home, "select count(*) from steps where tool_calls > 0")[1] == [(6,)]
    assert query(home, "select kind, count(*) from sft_examples group by 1 order by 1")[1] == [("agent", 6),
                                                                                              ("cot", 6)]
    # Evaluation: 5 methods × 6 questions, each exactly once; metrics per method and dataset; report files.
    once = query(home, "select count(*), count(distinct (method, question_id)) from predictions")[1]
    assert once == [(30, 30)]
    metrics = query(home, "select method, dataset, n, accuracy from metrics order by 1, 2")[1]
    assert len(metrics) == 10 and all(n in (2, 4) and acc == 1.0 for _, _, n, acc in metrics)
    folder = store.root / "evaluate" / evaluation["id"]
    assert (folder / "report.md").is_file() and (folder / "accuracy_by_dataset.png").is_file()

    # Second run: every stage is re-used, nothing is generated again.
    calls = len(generator.calls)
    again = pipeline_flow(cfg=cfg, home=str(home))
    assert again == results and len(generator.calls) == calls
    # `distillery run` answers a repeat from the store: the ids it computes are the flows' ids.
    assert cached_pipeline(store, cfg) == results

    # Changing only an evaluation setting re-runs only the evaluation.
    changed = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"num_shards": 3})})
    third = pipeline_flow(cfg=changed, home=str(home))
    assert third["adapter_agent"] == results["adapter_agent"] and third["evaluation"] != results["evaluation"]
    assert len(store.list("rollout")) == 1 and len(store.list("evaluate")) == 2
    assert cached_pipeline(store, changed) == third

    # `distillery evaluate --methods cot,agent` with a per-method limit: only those rows, the limited
    # method on the first question of each dataset; a new artifact beside the others.
    from common.errors import UserError
    from flows.pipeline import run_stage_flow

    methods = tuple(m.model_copy(update={"limit": 1}) if m.name == "cot" else m for m in cfg.evaluate.methods)
    chosen = cfg.evaluate.model_copy(update={"methods": methods}).only_methods(["agent", "cot"])
    assert [m.name for m in chosen.methods] == ["cot", "agent"]
    subset = run_stage_flow("evaluate", cfg.model_copy(update={"evaluate": chosen}), str(home))["evaluate"]
    counts = query(home, f"select method, dataset, n from metrics where artifact_id = '{subset.id}' order by 1, 2")[1]
    assert counts == [("agent", "facts", 2), ("agent", "math", 4), ("cot", "facts", 1), ("cot", "math", 1)]
    with pytest.raises(UserError, match=r"unknown evaluation method\(s\) \['sag'\]; the config has \['cot'"):
        cfg.evaluate.only_methods(["sag"])


def test_a_stage_flow_on_a_fresh_home_builds_each_missing_input_once(tiny_setup, home, prefect_harness):
    from flows.pipeline import run_stage_flow
    from flows.plans import plan_pipeline

    cfg, _ = tiny_setup
    methods = tuple(m for m in cfg.evaluate.methods if m.name == "agent-distilled")
    cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"methods": methods, "num_shards": 1})})
    plan = plan_pipeline(ArtifactStore(home), cfg, ("evaluate",))
    assert list(plan.stages) == ["index", "prefixes", "rollout", "sft/agent", "train/agent", "evaluate"]
    started = datetime.now(UTC)
    evaluation = run_stage_flow("evaluate", cfg, str(home))
    # One flow, the evaluate stage's: it builds its missing inputs in order through their tasks, each once.
    assert stage_flow_runs(started) == {**dict.fromkeys(STAGE_FLOWS, 0), "evaluate": 1}
    assert evaluation == {"evaluate": plan.ref("evaluate")} and all(plan.built(name) for name in plan.stages)
    assert stage_task_runs(started) == {name: 1 for name in ("index", "prefixes", "rollout", "sft", "train")}
    # The CoT student is not evaluated, so it is not trained.
    assert len(ArtifactStore(home).list("train")) == 1
