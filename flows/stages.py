"""The stages of the pipeline, stated once.

    index ──► prefixes (optional FTP) ──► rollout ──► sft ──► train ──► evaluate
                                                              └──► opd/1 ──► … ──► opd/K ──┘ (on-policy)

A stage has one name: its CLI command (``distillery rollout``), its Prefect flow and task, its artifact
folder (``<home>/rollout/<id>/``), its builder module (``tasks/rollout.py``) and its section in the docs.
Its entry below says what it reads under a config, what its artifact id hashes (the config sections and
input fingerprints of its ``identity``, its inputs' ids, the source of its ``code`` packages), what is
checked before it runs, and which function builds it. Everything else is derived from this tuple: the
plan (``flows.plans``), the CLI's stage commands, the preflight checks, the deployments and the code
hash of each artifact id.

Adding a stage: one ``Stage`` here and its builder ``tasks/<name>.py::build``, a Prefect task (or a
function running tasks) with the signature of ``Builder``; its domain code lives in a plain package.

The student stages (``sft``, ``train``) are planned once per student kind: ``train/agent`` (trained on the
teacher's agent trajectories) and ``train/cot`` (on its CoT solutions, when ``cot_student.enabled``). The
``opd`` stage is planned once per iteration (``opd/1`` … ``opd/K``), each reading the adapter before it; it is
built when an evaluation method runs the ``opd_student`` or when ``distillery opd`` asks for it.
Nothing here imports Prefect, so ``distillery --help`` stays instant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from flows import checks
from questions.datasets import dataset_fingerprint, with_limit
from retrieval.corpus import corpus_fingerprint
from storage.store import PACKAGES, ArtifactRef, student_adapters

if TYPE_CHECKING:  # the config imports torch (through training); the CLI imports this module for --help
    from flows.config import PipelineConfig


class StageOptions(BaseModel):
    """How a run builds its stages, beyond the config (the CLI's flags; deployment parameters)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resume: bool = Field(False, description="train: continue from the newest complete checkpoint")
    accelerate_config: str | None = Field(
        None, description="train: run training through `accelerate launch` with this config file")
    adapters: dict[str, ArtifactRef] | None = Field(
        None, description="evaluate these stored adapters (by student kind) instead of training the config's")


Builder = Callable[..., ArtifactRef]
"""``build(plan: StagePlan, cfg: PipelineConfig, inputs: dict[str, ArtifactRef], kind: str,
options: StageOptions) -> ArtifactRef``: writes the planned artifact (or finds it written) and returns it.
``inputs`` maps the planned names of the stages it reads (``index``, ``train/agent``) to their artifacts."""


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline (see the module docstring)."""

    name: str
    summary: str  # one line: the CLI's help, the deployment's description
    code: tuple[str, ...]  # packages whose source is part of the artifact id
    inputs: Callable[[PipelineConfig, str], tuple[str, ...]]  # (cfg, kind) -> planned names it reads
    identity: Callable[[PipelineConfig, str, dict[str, ArtifactRef]], dict]  # (cfg, kind, inputs) -> what the
    # artifact id hashes besides its inputs' ids and its code (config sections, fingerprints of files read)
    check: Callable[[PipelineConfig, str], None]  # (cfg, kind) -> raises UserError on a bad input
    builder: str = ""  # "module:function"; default tasks/<name>.py::build
    kinds: Callable[[PipelineConfig], tuple[str, ...]] = field(default=lambda cfg: ("",))
    pinned: Callable[[PipelineConfig], str | None] = field(default=lambda cfg: None)  # an existing artifact id

    def build(self) -> Builder:
        """The function that builds this stage (imported now: it imports Prefect)."""
        module, _, function = (self.builder or f"tasks.{self.name}:build").partition(":")
        return getattr(import_module(module), function)

    def instances(self, cfg: PipelineConfig) -> tuple[str, ...]:
        """The planned names of this stage under ``cfg``: ``index``, or ``train/agent`` and ``train/cot``."""
        return tuple(f"{self.name}/{kind}" if kind else self.name for kind in self.kinds(cfg))


# ----------------------------------------------------------------------------- what each stage reads

def rollout_inputs(cfg: PipelineConfig, kind: str) -> tuple[str, ...]:
    return ("index", "prefixes") if cfg.rollout.use_prefixes else ("index",)


def evaluate_inputs(cfg: PipelineConfig, kind: str) -> tuple[str, ...]:
    """The index, and the trained students the evaluation's methods run."""
    kinds = sorted({model.removesuffix("_student") for model in cfg.evaluate.distilled_models()})
    return ("index", *(f"opd/{cfg.opd.iterations}" if k == "opd" else f"train/{k}" for k in kinds))


def opd_inputs(cfg: PipelineConfig, kind: str) -> tuple[str, ...]:
    """Iteration k reads the index and the adapter of iteration k - 1 (the agent-distilled one for k = 1)."""
    return ("index", "train/agent" if kind == "1" else f"opd/{int(kind) - 1}")


def opd_check(cfg: PipelineConfig, kind: str) -> None:
    checks.check_backend(cfg.student)
    checks.check_backend(cfg.opd_scorer())
    checks.check_datasets(cfg.opd_datasets(), None)


def teacher_inputs_check(cfg: PipelineConfig, kind: str) -> None:
    checks.check_backend(cfg.teacher)
    checks.check_datasets(cfg.rollout.datasets, cfg.rollout.limit)


STAGES: tuple[Stage, ...] = (
    Stage(
        "index", "build (or reuse) the retrieval index and print its id",
        code=("common", "devices", "retrieval", "services", "storage"),
        inputs=lambda cfg, kind: (),
        identity=lambda cfg, kind, inputs: {"index": cfg.index.model_dump(mode="json"),
                                    "corpus_fingerprint": corpus_fingerprint(cfg.index.corpus)},
        check=lambda cfg, kind: checks.check_index_inputs(cfg.index),
    ),
    Stage(
        "prefixes", "the teacher's CoT solutions and first-thought prefixes (FTP)",
        code=("agent_runtime", "common", "devices", "evaluation", "questions", "services", "storage"),
        inputs=lambda cfg, kind: (),
        identity=lambda cfg, kind, inputs: {"prefixes": cfg.prefixes.model_dump(mode="json"),
                                    "teacher": cfg.teacher.model_dump(mode="json"),
                                    "datasets": [dataset_fingerprint(d) for d in cfg.rollout_datasets()]},
        check=teacher_inputs_check,
        pinned=lambda cfg: cfg.prefixes.artifact,
    ),
    Stage(
        "rollout", "generate, grade and store teacher trajectories",
        code=("agent_runtime", "common", "devices", "evaluation", "questions", "retrieval", "services",
              "storage"),
        inputs=rollout_inputs,
        identity=lambda cfg, kind, inputs: {
            "rollout": cfg.rollout.model_dump(mode="json"), "teacher": cfg.teacher.model_dump(mode="json"),
            "sandbox": cfg.sandbox.model_dump(mode="json"), "search": cfg.search.model_dump(mode="json"),
            "datasets": [dataset_fingerprint(d) for d in cfg.rollout_datasets()]},
        check=teacher_inputs_check,
        pinned=lambda cfg: cfg.rollout.artifact,
    ),
    Stage(
        "sft", "filter the trajectories (or CoT solutions) into a student's chat-format training examples",
        code=("agent_runtime", "common", "services", "storage", "training"),
        inputs=lambda cfg, kind: ("prefixes",) if kind == "cot" else ("rollout",),
        identity=lambda cfg, kind, inputs: {"sft": cfg.sft.model_dump(mode="json"), "kind": kind},
        check=lambda cfg, kind: None,
        kinds=lambda cfg: cfg.student_kinds(),
    ),
    Stage(
        "train", "LoRA-fine-tune the student on its training examples",
        code=("common", "devices", "services", "storage", "training"),
        inputs=lambda cfg, kind: (f"sft/{kind}",),
        identity=lambda cfg, kind, inputs: {"train": cfg.train_config(kind).model_dump(mode="json")},
        check=lambda cfg, kind: checks.check_base_model(cfg.train_config(kind).base_model),
        kinds=lambda cfg: cfg.student_kinds(),
    ),
    Stage(
        "opd", "on-policy distillation: the student learns on its own episodes from the teacher's token log-probs",
        code=("agent_runtime", "common", "devices", "evaluation", "questions", "retrieval", "services", "storage",
              "training"),
        inputs=opd_inputs,
        identity=lambda cfg, kind, inputs: {
            "opd": cfg.opd.identity(), "iteration": int(kind), "student": cfg.student.model_dump(mode="json"),
            "scorer": cfg.opd_scorer().model_dump(mode="json"), "sandbox": cfg.sandbox.model_dump(mode="json"),
            "search": cfg.search.model_dump(mode="json"),
            "datasets": [dataset_fingerprint(d) for d in cfg.opd_datasets()]},
        check=opd_check,
        kinds=lambda cfg: tuple(str(k) for k in range(1, cfg.opd.iterations + 1)),
    ),
    Stage(
        "evaluate", "evaluate baselines and students, sharded; write metrics and a report",
        code=PACKAGES,
        inputs=evaluate_inputs,
        identity=lambda cfg, kind, inputs: {
            "evaluate": cfg.evaluate.model_dump(mode="json"), "student": cfg.student.model_dump(mode="json"),
            "teacher": cfg.teacher.model_dump(mode="json"), "sandbox": cfg.sandbox.model_dump(mode="json"),
            "search": cfg.search.model_dump(mode="json"),
            "datasets": [dataset_fingerprint(with_limit(d, cfg.evaluate.limit)) for d in cfg.evaluate.datasets],
            "adapters": {kind: ref.id for kind, ref in sorted(student_adapters(inputs).items())}},
        check=lambda cfg, kind: checks.check_evaluate_inputs(cfg.evaluate, cfg.teacher, cfg.student),
    ),
)

PIPELINE = ("train", "evaluate")
"""What ``distillery run`` builds: every student's adapter and the evaluation (and what they read)."""


def stage(name: str) -> Stage:
    """The stage of a stage name or a planned name (``train/agent`` → the ``train`` stage)."""
    base = name.partition("/")[0]
    for entry in STAGES:
        if entry.name == base:
            return entry
    raise KeyError(f"no stage {base!r}; the stages are {', '.join(s.name for s in STAGES)}")


def stage_names() -> tuple[str, ...]:
    return tuple(s.name for s in STAGES)
