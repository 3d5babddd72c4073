"""Prefect deployments: the pipeline, each stage, and the scheduled re-evaluation. CLI: ``distillery serve``.

Every deployment takes the typed ``cfg: PipelineConfig`` (so the Prefect UI renders a form for it,
prefilled with the served profile) and ``home``, the artifact root. The pipeline's form starts with a
profile and a few knobs (teacher, student, question limits) and has the full config last, empty when
the served config is a shipped profile (see ``pipeline_flow``). ``reevaluate`` also carries the cron
schedule of ``cfg.reevaluate``: every night, say, it scores the newest adapter (or the listed ones) on
the configured benchmarks and publishes the report.

Two ways to run them:
- ``distillery serve`` registers the deployments and executes their runs in this process's children
  (``prefect.serve``); against an ephemeral API for a quick look, or the server in ``PREFECT_API_URL``.
- ``distillery serve --pool NAME`` registers them in the process work pool NAME (created if missing)
  and returns; ``prefect worker start --pool NAME --type process`` on any machine with distillery
  installed and the artifact root mounted runs them.

Entrypoints are module paths (``flows.pipeline.stage_flow``: every stage's deployment runs it under
the stage's name, with its ``stage`` parameter set), so a worker loads the flows from the installed
package, whatever its working directory.
"""

from __future__ import annotations

import os
import signal
from typing import get_args

from prefect import flow, serve
from prefect.artifacts import create_markdown_artifact
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron

from flows import stages
from flows.config import PipelineConfig
from flows.pipeline import pipeline_flow, resolve_config, run_stage_flow, stage_flow
from flows.settings import ConfigError, Profile, load_config, profile_path
from flows.stages import StageOptions
from storage.catalog import read_table
from storage.store import ArtifactError, ArtifactRef, ArtifactStore, default_root

DEPLOYMENT_NAME = "distillery"
"""Every deployment is ``<flow name>/distillery``, e.g. ``pipeline/distillery``, ``reevaluate/distillery``."""


@flow(name="reevaluate", log_prints=True)
def reevaluate_flow(profile: Profile = "demo", cfg: PipelineConfig | None = None,
                    home: str | None = None) -> dict[str, ArtifactRef]:
    """Evaluate stored adapters (``cfg.reevaluate.adapters``, default: the newest) on the benchmarks.

    Each adapter is evaluated with the ``evaluate`` methods that use its kind of student (agent or CoT),
    on ``cfg.reevaluate.datasets`` (default: ``cfg.evaluate.datasets``). Returns one ``evals`` artifact
    per adapter id and publishes a markdown summary keyed ``reevaluate-latest``.
    """
    cfg = resolve_config(profile, cfg=cfg)
    store = ArtifactStore(home or default_root())
    ids = cfg.reevaluate.adapters or (newest_adapter(store),)
    results = {}
    for adapter_id in ids:
        adapter = store.resolve(adapter_id)
        if adapter.stage != "train":
            raise ConfigError(f"reevaluate.adapters: {adapter_id!r} is a {adapter.stage} artifact, "
                              "not an adapter")
        kind = adapter_kind(store, adapter)
        eval_cfg = reevaluation_config(cfg, kind, store.manifest(adapter)["config"]["train"]["base_model"])
        evaluated = run_stage_flow("evaluate", eval_cfg, str(store.root), StageOptions(adapters={kind: adapter}))
        results[adapter.id] = evaluated["evaluate"]
    create_markdown_artifact(markdown=summary_markdown(results), key="reevaluate-latest",
                             description="scheduled re-evaluation of the distilled students")
    return results


def newest_adapter(store: ArtifactStore) -> str:
    """The id of the most recently finished adapter under the store root."""
    manifests = store.list("train")
    if not manifests:
        raise ArtifactError(f"no complete adapter under {store.root}: train one first (distillery train) "
                            f"or list adapter ids in reevaluate.adapters")
    return manifests[-1]["id"]


def adapter_kind(store: ArtifactStore, adapter: ArtifactRef) -> str:
    """'agent' or 'cot': the kind of examples the adapter was trained on (its ``sft`` parent's config)."""
    parents = store.manifest(adapter)["parents"]
    data = [store.manifest(p) for p in parents]
    kinds = [m["config"]["kind"] for m in data if m["stage"] == "sft"]
    if len(kinds) != 1:
        raise ArtifactError(f"adapter {adapter.id}: expected one sft parent, found {parents}")
    return kinds[0]


def reevaluation_config(cfg: PipelineConfig, kind: str, base_model: str) -> PipelineConfig:
    """``cfg`` narrowed to the methods of the ``kind`` student, on the re-evaluation datasets."""
    if base_model != cfg.student.model:
        raise ConfigError(f"the adapter was trained on {base_model!r} but student.model is "
                          f"{cfg.student.model!r}; set student.model to the adapter's base model")
    methods = tuple(m for m in cfg.evaluate.methods if m.model == f"{kind}_student")
    if not methods:
        raise ConfigError(f"evaluate.methods has no method with model '{kind}_student' "
                          f"to evaluate a {kind} adapter")
    datasets = cfg.reevaluate.datasets or cfg.evaluate.datasets
    return cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"methods": methods,
                                                                               "datasets": datasets})})


def summary_markdown(results: dict[str, ArtifactRef]) -> str:
    from evaluation.report import table2_markdown

    parts = ["# Re-evaluation\n"]
    for adapter_id, evaluation in results.items():
        parts.append(f"## adapter `{adapter_id}` → evals `{evaluation.id}`\n")
        parts.append(table2_markdown(read_table(evaluation.path, "metrics")) + "\n")
        parts.append(f"report: `{evaluation.path / 'report.md'}`\n")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- deployments

def build_deployments(cfg: PipelineConfig, home: str, schedule_active: bool = True) -> list[RunnerDeployment]:
    """The deployments of the pipeline, each stage and the re-evaluation, with ``cfg``/``home`` as defaults
    (the pipeline's: ``pipeline_parameters``).

    The re-evaluation gets the cron schedule of ``cfg.reevaluate`` when it is enabled; with
    ``schedule_active=False`` the schedule is registered paused (visible, switchable in the UI).
    """
    defaults = {"cfg": cfg.model_dump(mode="json"), "home": home}
    deployments = [pipeline_flow.to_deployment(
        name=DEPLOYMENT_NAME, description="every stage: index → rollouts → LoRA → evaluation (cached by artifact id)",
        parameters=pipeline_parameters(cfg, home), tags=["distillery", "pipeline"],
        entrypoint_type=EntrypointType.MODULE_PATH)]
    deployments += [
        stage_flow.with_options(name=entry.name).to_deployment(
            name=DEPLOYMENT_NAME, description=entry.summary, parameters={"stage": entry.name, **defaults},
            tags=["distillery", entry.name], entrypoint_type=EntrypointType.MODULE_PATH)
        for entry in stages.STAGES
    ]
    reeval = cfg.reevaluate
    schedules = [Cron(reeval.cron, timezone=reeval.timezone, active=schedule_active)] if reeval.enabled else []
    deployments.append(reevaluate_flow.to_deployment(
        name=DEPLOYMENT_NAME, parameters=defaults, schedules=schedules, tags=["distillery", "reevaluate"],
        description="evaluate the newest (or listed) adapters on the benchmarks and publish the report",
        entrypoint_type=EntrypointType.MODULE_PATH))
    return deployments


def pipeline_parameters(cfg: PipelineConfig, home: str) -> dict:
    """The pipeline form's defaults: the profile's name when ``cfg`` is exactly a shipped profile, else ``cfg``.

    So a plain ``distillery server`` offers the profile choice with the full config left empty, and a served
    custom file or ``--set`` override still reaches the run (a given ``cfg`` takes precedence over the profile).
    """
    for profile in get_args(Profile):
        if load_config(PipelineConfig, profile_path(profile)) == cfg:
            return {"profile": profile, "home": home}
    return {"cfg": cfg.model_dump(mode="json"), "home": home}


def serve_deployments(cfg: PipelineConfig, home: str, schedule_active: bool = True) -> None:
    """Register the deployments and run their flow runs until Ctrl+C or SIGTERM (blocks)."""
    # Prefect 3.8's runner shuts down cleanly on SIGTERM (pauses the schedules, stops the temporary
    # API server) but can hang forever on SIGINT with an ephemeral API; so Ctrl+C takes the SIGTERM path.
    signal.signal(signal.SIGINT, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))
    serve(*build_deployments(cfg, home, schedule_active))


def register_in_pool(cfg: PipelineConfig, home: str, pool: str, schedule_active: bool = True) -> list[str]:
    """Register the deployments in the process work pool ``pool`` (created if missing); returns their ids."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass  # a worker (or an earlier registration) made it first
    return [str(d.apply(work_pool_name=pool)) for d in build_deployments(cfg, home, schedule_active)]
