"""The flows: one per stage, and the whole pipeline. CLI: ``distillery <stage>``, ``distillery run``.

Every stage runs through ``stage_flow``, under the stage's own name (``index``, ``rollout``, …, see
``flows.stages``): it plans the stage under the config, checks the inputs of what is missing, and builds
the missing stages upstream first (``flows.plans.build_missing``), each through its builder. Stage flows
never call each other. The pipeline flow runs each stage's flow once, in the registry's order, so each finds
its inputs built; every stage is cached by artifact id, so a re-run with the same config re-uses
everything and a change to evaluation settings re-runs only the evaluation.

Parameters are the run forms of the deployments: the profile (default ``demo``), then the full config,
which takes precedence when given (see ``resolve_config``).
"""

from __future__ import annotations

from prefect import flow

from flows import stages
from flows.config import PipelineConfig
from flows.plans import build_missing, check_plan, plan_pipeline
from flows.settings import Profile, load_config, profile_path
from flows.stages import StageOptions
from storage.store import ArtifactRef, ArtifactStore, default_root


@flow(name="stage", log_prints=True)
def stage_flow(stage: str, profile: Profile = "demo", cfg: PipelineConfig | None = None, home: str | None = None,
               options: StageOptions | None = None) -> dict[str, ArtifactRef]:
    """Build (or reuse) the stage ``stage`` and what it reads; returns its artifacts by planned name.

    Args:
        stage: the stage to build (a name of ``flows.stages.STAGES``; each stage's deployment sets it)
        profile: a YAML profile of the repository's configs/ folder; ignored when cfg is given
        cfg: the complete config (not a patch of the profile); None: the profile's
        home: the artifact root (default: $DISTILLERY_HOME or .distillery)
        options: resume or launcher of training, stored adapters to evaluate
    """
    cfg = resolve_config(profile, cfg=cfg)
    options = options or StageOptions()
    plan = plan_pipeline(ArtifactStore(home or default_root()), cfg, (stage,), options.adapters)
    check_plan(plan, cfg)
    build_missing(plan, cfg, options)
    return plan.of(stage)


def run_stage_flow(stage: str, cfg: PipelineConfig, home: str, options: StageOptions | None = None
                   ) -> dict[str, ArtifactRef]:
    """Run ``stage_flow`` as the flow named ``stage`` (how the CLI and the pipeline call a stage)."""
    return stage_flow.with_options(name=stage)(stage, cfg=cfg, home=home, options=options)


@flow(name="pipeline", log_prints=True)
def pipeline_flow(
    profile: Profile = "demo",
    teacher_model: str | None = None,
    student_model: str | None = None,
    rollout_limit: int | None = None,
    evaluate_limit: int | None = None,
    cfg: PipelineConfig | None = None,
    home: str | None = None,
) -> dict[str, ArtifactRef]:
    """Run (or re-use) every stage; returns the students' adapters and the evaluation.

    The config is ``cfg`` when given (it is then the complete config and ``profile`` is ignored), else the
    profile's YAML; the knobs that are set override it. ``distillery run`` passes ``cfg`` only.

    Args:
        profile: a YAML profile of the repository's configs/ folder; ignored when cfg is given
        teacher_model: sets teacher.model
        student_model: sets student.model and the base model of the trained students
        rollout_limit: the teacher solves only the first N questions of each training dataset (rollout.limit)
        evaluate_limit: evaluate on only the first N questions of each test dataset (evaluate.limit)
        cfg: the complete config (not a patch of the profile); None: the profile's
        home: the artifact root (default: $DISTILLERY_HOME or .distillery)
    """
    cfg = resolve_config(profile, teacher_model, student_model, rollout_limit, evaluate_limit, cfg)
    plan = plan_pipeline(ArtifactStore(home or default_root()), cfg)
    home = str(plan.store.root)
    for entry in stages.STAGES:
        if any(name in plan for name in entry.instances(cfg)):
            run_stage_flow(entry.name, cfg, home)
    return plan.results()


def resolve_config(profile: Profile = "demo", teacher_model: str | None = None, student_model: str | None = None,
                   rollout_limit: int | None = None, evaluate_limit: int | None = None,
                   cfg: PipelineConfig | None = None) -> PipelineConfig:
    """The config of a run: ``cfg`` if given, else the ``profile``'s YAML, with the set knobs applied."""
    base = cfg if cfg is not None else load_config(PipelineConfig, profile_path(profile))
    if not any((teacher_model, student_model, rollout_limit is not None, evaluate_limit is not None)):
        return base
    data = base.model_dump()
    if teacher_model:
        data["teacher"]["model"] = teacher_model
    if student_model:  # the adapters are trained on top of the student model, so their base follows it
        data["student"]["model"] = data["train"]["base_model"] = student_model
        data["cot_student"]["train"]["base_model"] = student_model
    if rollout_limit is not None:
        data["rollout"]["limit"] = rollout_limit
    if evaluate_limit is not None:
        data["evaluate"]["limit"] = evaluate_limit
    return PipelineConfig.model_validate(data)
