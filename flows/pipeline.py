"""The whole pipeline as one parent flow. CLI: ``distillery run`` (and ``make demo``).

index → FTP prefixes (optional) → teacher rollouts → filter + train the agent-distilled student (and
the CoT-distilled one when enabled) → evaluate baselines and students → report. Each stage flow runs
once, in this order, so each finds its inputs built; every stage is cached by artifact id (see
``flows.plans``), so a re-run with the same config re-uses everything and a change to evaluation
settings re-runs only the evaluation.

Its parameters are the run form of the ``pipeline`` deployment, in this order: the profile, a few knobs,
then the full config (see ``pipeline_flow`` for which wins).
"""

from __future__ import annotations

from prefect import flow

from flows.config import PipelineConfig
from flows.evaluate import evaluate_flow
from flows.index import index_flow
from flows.plans import pipeline_results, plan_pipeline
from flows.rollout import prefixes_flow, rollout_flow
from flows.settings import Profile, load_config, profile_path
from flows.train import train_flow
from storage.store import ArtifactRef, ArtifactStore, default_root


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
    index_flow(cfg, home=home)
    if "prefixes" in plan:  # the FTP prefixes, or the CoT student's training data
        prefixes_flow(cfg, home=home)
    rollout_flow(cfg, home=home)
    adapters = train_flow(cfg, home=home)
    evaluation = evaluate_flow(cfg, home=home)
    return pipeline_results(adapters, evaluation)


def resolve_config(profile: Profile = "demo", teacher_model: str | None = None, student_model: str | None = None,
                   rollout_limit: int | None = None, evaluate_limit: int | None = None,
                   cfg: PipelineConfig | None = None) -> PipelineConfig:
    """The config of a pipeline run: ``cfg`` if given, else the ``profile``'s YAML, with the set knobs applied."""
    base = cfg if cfg is not None else load_config(PipelineConfig, profile_path(profile))
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
