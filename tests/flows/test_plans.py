"""The plan of a run: which stages a config needs, what each reads, and which are built, without Prefect.

Artifacts are "built" here by writing their manifests (``store.open(plan).finish()``): the plan only
looks at ids and manifests.
"""

import json

import pytest

from flows.config import PipelineConfig
from flows.plans import cached_pipeline, check_plan, plan_pipeline
from flows.stages import PIPELINE
from storage.store import ArtifactError, ArtifactStore

DISTILLED = [{"name": "agent", "model": "student", "mode": "agent"},
             {"name": "agent-distilled", "model": "agent_student"},
             {"name": "cot-distilled", "model": "cot_student", "mode": "cot"}]


@pytest.fixture
def config(tmp_path):
    """A config over tiny files; ``config(**sections)`` replaces whole sections."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "1", "title": "Mars", "text": "Mars is red."}) + "\n")
    questions = tmp_path / "math.jsonl"
    questions.write_text(json.dumps({"id": "q1", "question": "What is 2 + 3?", "answer": "5"}) + "\n")
    dataset = {"name": "math", "source": str(questions), "kind": "math"}

    def make(**sections) -> PipelineConfig:
        return PipelineConfig.model_validate({
            "index": {"corpus": {"source": str(corpus)}},
            "teacher": {"kind": "scripted", "model": "teacher"},
            "rollout": {"datasets": [dataset], "use_prefixes": True},
            "cot_student": {"enabled": True},
            "evaluate": {"datasets": [dataset], "methods": DISTILLED},
            **sections,
        })
    return make


def build(store: ArtifactStore, plan, *names: str) -> None:
    for name in names:
        store.open(plan[name].plan).finish()


def test_the_plan_states_the_chain_and_reports_what_is_built(tmp_path, config):
    store, cfg = ArtifactStore(tmp_path / "home"), config()
    plan = plan_pipeline(store, cfg)
    assert {name: stage.inputs for name, stage in plan.stages.items()} == {
        "index": (), "prefixes": (), "rollout": ("index", "prefixes"),
        "sft/agent": ("rollout",), "train/agent": ("sft/agent",),
        "sft/cot": ("prefixes",), "train/cot": ("sft/cot",),
        "evaluate": ("index", "train/agent", "train/cot"),
    }
    assert not any(plan.built(name) for name in plan.stages) and all(plan.missing(n) for n in plan.stages)
    assert cached_pipeline(store, cfg) is None
    # Parents in the plan are the parents each artifact records.
    assert plan["rollout"].plan.parents == (plan.ref("index").id, plan.ref("prefixes").id)
    assert plan["evaluate"].plan.parents == (plan.ref("index").id, plan.ref("train/agent").id,
                                          plan.ref("train/cot").id)

    build(store, plan, "index", "prefixes")
    assert plan.built("index") and not plan.missing("index") and plan.missing("rollout")
    build(store, plan, *list(plan.stages)[2:])
    again = plan_pipeline(store, cfg)
    assert again.stages == plan.stages and again.complete() and not any(again.missing(n) for n in again.stages)
    assert cached_pipeline(store, cfg) == {"adapter_agent": plan.ref("train/agent"),
                                           "adapter_cot": plan.ref("train/cot"), "evaluation": plan.ref("evaluate")}


def test_only_what_a_missing_target_reads_is_to_be_built(tmp_path, config):
    store, cfg = ArtifactStore(tmp_path / "home"), config()
    plan = plan_pipeline(store, cfg)
    build(store, plan, "sft/agent", "sft/cot")
    # The students' data exists: training needs neither rollouts nor prefixes (nor the index).
    train = plan_pipeline(store, cfg, ("train",))
    assert [n for n in train.stages if train.missing(n)] == ["train/agent", "train/cot"]
    # The index is read by the evaluation itself, so it is built for it.
    evaluate = plan_pipeline(store, cfg, ("evaluate",))
    assert [n for n in evaluate.stages if evaluate.missing(n)] == ["index", "train/agent", "train/cot",
                                                                   "evaluate"]


def test_a_stage_command_plans_only_its_stage_and_inputs(tmp_path, config):
    store = ArtifactStore(tmp_path / "home")
    unread = {"name": "gone", "source": str(tmp_path / "missing.jsonl"), "kind": "math"}
    cfg = config(rollout={"datasets": [unread]}, evaluate={"datasets": [unread]})
    assert list(plan_pipeline(store, cfg, ("index",)).stages) == ["index"]  # reads no dataset
    cfg = config(evaluate={"methods": DISTILLED[:1]})
    assert {n: s.inputs for n, s in plan_pipeline(store, cfg, ("evaluate",)).stages.items()} == {
        "index": (), "evaluate": ("index",)}
    # Without FTP and the CoT student no stage reads the prefixes: they are not planned.
    plain = config(rollout={"datasets": cfg.rollout.model_dump()["datasets"], "use_prefixes": False},
                   cot_student={"enabled": False})
    assert list(plan_pipeline(store, plain).stages) == ["index", "rollout", "sft/agent",
                                                        "train/agent", "evaluate"]


def test_pinned_stages_are_resolved_and_never_built(tmp_path, config):
    store, cfg = ArtifactStore(tmp_path / "home"), config()
    full = plan_pipeline(store, cfg)
    build(store, full, "prefixes", "rollout")
    pins = {"artifact": full.ref("rollout").id[:8]}
    pinned = plan_pipeline(store, config(rollout={**cfg.rollout.model_dump(), **pins}))
    assert pinned["rollout"].pinned and pinned["rollout"].inputs == ()
    assert pinned.ref("rollout") == full.ref("rollout") and not pinned.missing("rollout")
    assert pinned.ref("train/agent") == full.ref("train/agent")  # same ids downstream
    prefixes = plan_pipeline(store, config(prefixes={"artifact": full.ref("prefixes").id}), ("train",))
    assert prefixes["prefixes"].pinned and prefixes.ref("train/cot") == full.ref("train/cot")
    with pytest.raises(ArtifactError, match="is a prefixes artifact, not rollout"):
        plan_pipeline(store, config(rollout={**cfg.rollout.model_dump(), "artifact": full.ref("prefixes").id}))
    # Adapters given by the caller (the re-evaluation) are the evaluation's inputs as they are.
    given = {"agent": full.ref("rollout")}
    evaluate = plan_pipeline(store, config(evaluate={**cfg.evaluate.model_dump(), "methods": DISTILLED[:2]}),
                             ("evaluate",), given)
    assert list(evaluate.stages) == ["index", "train/agent", "evaluate"] and evaluate["train/agent"].pinned
    assert evaluate["evaluate"].plan.parents == (full.ref("index").id, full.ref("rollout").id)


def check_command(cfg, command: str, store: ArtifactStore) -> None:
    """What ``distillery <command>`` checks before it starts a flow."""
    check_plan(plan_pipeline(store, cfg, PIPELINE if command == "run" else (command,)), cfg)


def test_the_checks_read_only_what_the_plan_still_builds(tmp_path, config):
    from models.resolve import ModelNotAvailable

    store = ArtifactStore(tmp_path / "home")
    teacher = {"kind": "transformers", "model": "no-such-teacher"}
    cfg = config(teacher=teacher)
    with pytest.raises(ModelNotAvailable, match="no-such-teacher"):
        check_command(cfg, "rollout", store)
    check_command(cfg, "index", store)  # the index does not read the teacher
    # Once the teacher's stages are built, rollouts, training and the pipeline need no teacher.
    build(store, plan_pipeline(store, cfg, ("rollout",)), "index", "prefixes", "rollout")
    for command in ("rollout", "train", "run"):
        check_command(cfg, command, store)
    # A pinned rollout reads nothing either, even in a fresh home.
    pinned_home = ArtifactStore(tmp_path / "pinned")
    trajectories = plan_pipeline(store, cfg, ("rollout",))["rollout"].ref
    build(pinned_home, plan_pipeline(pinned_home, cfg, ("rollout",)), "rollout")
    assert pinned_home.exists(trajectories)
    pinned = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"artifact": trajectories.id}),
                                    "cot_student": cfg.cot_student.model_copy(update={"enabled": False})})
    check_command(pinned, "train", pinned_home)
    # An unknown student base model fails the train check, naming it.
    bad_student = pinned.model_copy(update={"train": pinned.train.model_copy(update={"base_model": "no-such-student"})})
    with pytest.raises(ModelNotAvailable, match="no-such-student"):
        check_command(bad_student, "train", pinned_home)
