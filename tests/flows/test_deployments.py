"""Deployments: typed parameter forms, the re-evaluation schedule from the config, what the reevaluate
flow evaluates, the server script's environment, and (marked ``server`` and ``slow``) the whole path
through a real ``prefect server start``: register, trigger with run_deployment, query the artifacts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from flows_fixtures import demo

from bench.local_services import registered, start_service, stop
from flows.cli import build_parser
from flows.config import PipelineConfig
from flows.deployments import (
    DEPLOYMENT_NAME,
    adapter_kind,
    build_deployments,
    newest_adapter,
    pipeline_parameters,
    reevaluate_flow,
    reevaluation_config,
)
from flows.pipeline import pipeline_flow, resolve_config
from flows.server import client_env, serve_argv, server_env
from flows.settings import ConfigError, load_config, profile_path
from flows.stages import stage_names
from questions.datasets import DatasetConfig
from services.processes import free_port, project_env, tail
from storage.store import ArtifactStore

ROOT = Path(__file__).resolve().parents[2]
FLOWS = {"pipeline", *stage_names(), "reevaluate"}


def by_flow(deployments) -> dict:
    return {d.flow_name: d for d in deployments}


# ----------------------------------------------------------------------------- deployments

def test_every_stage_is_a_deployment_with_a_typed_form(tmp_path):
    cfg = demo("rollout.limit=3")
    deployments = by_flow(build_deployments(cfg, str(tmp_path)))
    assert set(deployments) == FLOWS
    for flow_name, deployment in deployments.items():
        assert deployment.name == DEPLOYMENT_NAME
        assert deployment.entrypoint.startswith("flows.") and deployment.entrypoint.endswith("_flow")
        # The form is prefilled with the served profile, overrides included; a stage's names the stage.
        stage = {"stage": flow_name} if flow_name in stage_names() else {}
        assert deployment.parameters == {**stage, "cfg": cfg.model_dump(mode="json"), "home": str(tmp_path)}
        assert deployment.parameters["cfg"]["rollout"]["limit"] == 3
        schema = deployment._parameter_openapi_schema.model_dump()
        # The pipeline's cfg is optional (a profile can stand in for it): a ref to the model, or null.
        assert "#/definitions/PipelineConfig" in json.dumps(schema["properties"]["cfg"]), flow_name
        pipeline = schema["definitions"]["PipelineConfig"]["properties"]
        assert {"index", "rollout", "train", "evaluate", "reevaluate"} <= set(pipeline)
        limit = schema["definitions"]["RolloutConfig"]["properties"]["limit"]
        assert limit["description"] == "take only the first N questions of each dataset"
        assert flow_name in deployment.tags
    # Every stage's form: the stage, the profile or the full config, the home, and the run options.
    assert set(deployments["train"]._parameter_openapi_schema.properties) == {
        "stage", "profile", "cfg", "home", "options"}
    options = deployments["train"]._parameter_openapi_schema.model_dump()["definitions"]["StageOptions"]
    assert {"resume", "accelerate_config", "adapters"} <= set(options["properties"])


def test_reevaluation_schedule_comes_from_the_config(tmp_path):
    cfg = demo("reevaluate.cron=30 3 * * 1", "reevaluate.timezone=Europe/Paris")
    reeval = by_flow(build_deployments(cfg, str(tmp_path)))["reevaluate"]
    [schedule] = reeval.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("30 3 * * 1", "Europe/Paris",
                                                                                     True)
    paused = by_flow(build_deployments(cfg, str(tmp_path), schedule_active=False))["reevaluate"]
    assert [s.active for s in paused.schedules] == [False]
    disabled = by_flow(build_deployments(demo("reevaluate.enabled=false"), str(tmp_path)))["reevaluate"]
    assert disabled.schedules == []
    others = [d for d in build_deployments(cfg, str(tmp_path)) if d.flow_name != "reevaluate"]
    assert all(not d.schedules for d in others)


@pytest.mark.parametrize("key, value, message", [
    ("cron", "0 2 * *", "not a cron expression of 5 fields"),
    ("timezone", "Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
])
def test_a_bad_schedule_names_the_file_and_key(tmp_path, key, value, message):
    profile = tmp_path / "profile.yaml"
    profile.write_text(f"reevaluate:\n  {key}: '{value}'\n")
    with pytest.raises(ConfigError) as error:
        load_config(PipelineConfig, profile)
    assert str(profile) in str(error.value) and f"reevaluate.{key}" in str(error.value)
    assert message in str(error.value)


# ----------------------------------------------------------------------------- the pipeline's run form

KNOBS = ["teacher_model", "student_model", "rollout_limit", "evaluate_limit"]


def test_pipeline_form_starts_with_the_profile_then_the_knobs(tmp_path):
    pipeline = by_flow(build_deployments(demo(), str(tmp_path)))["pipeline"]
    properties = pipeline._parameter_openapi_schema.model_dump()["properties"]
    # The UI orders fields by "position": the profile, the knobs, then the full config and the root.
    by_position = sorted(properties, key=lambda name: properties[name]["position"])
    assert by_position == ["profile", *KNOBS, "cfg", "home"]
    assert properties["profile"]["enum"] == ["demo", "cpu-study", "paper"]
    assert properties["rollout_limit"]["description"].startswith("the teacher solves only the first N questions")
    # Served as the plain demo profile: the form offers the profile, the full config stays empty.
    assert pipeline.parameters == {"profile": "demo", "home": str(tmp_path)}


def test_pipeline_form_defaults_name_the_served_profile_or_carry_the_whole_config(tmp_path):
    study = load_config(PipelineConfig, profile_path("cpu-study"))
    assert pipeline_parameters(study, str(tmp_path)) == {"profile": "cpu-study", "home": str(tmp_path)}
    changed = demo("rollout.limit=3")
    assert pipeline_parameters(changed, str(tmp_path)) == {"cfg": changed.model_dump(mode="json"),
                                                            "home": str(tmp_path)}


class Planned(Exception):
    """Raised by the stand-in planner: the pipeline got as far as planning, with this config."""


def test_a_run_of_the_pipeline_form_uses_the_profile_and_the_knobs(tmp_path, monkeypatch):
    def plan(store, cfg):
        raise Planned(cfg)

    monkeypatch.setattr("flows.pipeline.plan_pipeline", plan)
    pipeline = by_flow(build_deployments(demo(), str(tmp_path)))["pipeline"]
    knobs = {"teacher_model": "qwen2.5-coder-0.5b-instruct", "student_model": "smollm2-135m-instruct",
             "rollout_limit": 3, "evaluate_limit": 2}
    # What a run triggered from the form executes: the deployment's defaults, the form's values, Prefect's casting.
    parameters = pipeline_flow.validate_parameters({**pipeline.parameters, "profile": "cpu-study", **knobs})
    with pytest.raises(Planned) as planned:
        pipeline_flow.fn(**parameters)
    expected = load_config(PipelineConfig, profile_path("cpu-study"), [
        "teacher.model=qwen2.5-coder-0.5b-instruct", "student.model=smollm2-135m-instruct",
        "train.base_model=smollm2-135m-instruct", "cot_student.train.base_model=smollm2-135m-instruct",
        "rollout.limit=3", "evaluate.limit=2"])
    [cfg] = planned.value.args
    assert cfg == expected
    assert cfg.rollout.use_prefixes and cfg.cot_student.enabled  # the rest is the cpu-study profile's


def test_a_given_config_is_complete_and_the_knobs_still_apply():
    cfg = demo("rollout.limit=3")
    assert resolve_config("paper", cfg=cfg) == cfg  # the profile is ignored
    assert resolve_config("paper", evaluate_limit=1, cfg=cfg) == demo("rollout.limit=3", "evaluate.limit=1")
    for profile in ("demo", "cpu-study", "paper"):  # no knob: the profile exactly, as `distillery run` loads it
        assert resolve_config(profile) == load_config(PipelineConfig, profile_path(profile))


# ----------------------------------------------------------------------------- re-evaluation

def store_adapter(store: ArtifactStore, kind: str, created: str, base_model: str = "smollm2-135m-instruct"):
    """An sft_data artifact of ``kind`` and an adapter trained on it, finished at ``created``."""
    data = store.begin("sft", {"sft": {}, "kind": kind}, []).finish()
    # ``created`` is part of the config so that two adapters of one kind get two ids.
    adapter = store.begin("train", {"train": {"base_model": base_model}, "at": created}, [data.id]).finish()
    manifest_path = adapter.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "created": created}))
    return adapter


def test_reevaluation_config_keeps_the_adapter_kind_methods_and_the_configured_datasets():
    cfg = demo()
    agent = reevaluation_config(cfg, "agent", cfg.student.model)
    assert [m.name for m in agent.evaluate.methods] == ["agent-distilled", "agent-distilled+sag"]
    assert agent.evaluate.datasets == cfg.evaluate.datasets
    other = DatasetConfig(name="tiny", source="builtin:arith", split="test", kind="math", num_questions=2)
    cfg = cfg.model_copy(update={"reevaluate": cfg.reevaluate.model_copy(update={"datasets": (other,)})})
    assert reevaluation_config(cfg, "agent", cfg.student.model).evaluate.datasets == (other,)
    assert agent.index == cfg.index and agent.evaluate.agent == cfg.evaluate.agent


def test_reevaluation_config_refuses_what_it_cannot_evaluate():
    cfg = demo()
    with pytest.raises(ValueError, match="trained on 'other-model' but student.model is 'smollm2-135m-instruct'"):
        reevaluation_config(cfg, "agent", "other-model")
    with pytest.raises(ValueError, match="no method with model 'cot_student'"):
        reevaluation_config(cfg, "cot", cfg.student.model)


def test_newest_adapter_and_its_kind(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(ValueError, match="no complete adapter under"):
        newest_adapter(store)
    old = store_adapter(store, "agent", "2025-01-01T00:00:00+0000")
    new = store_adapter(store, "cot", "2025-06-01T00:00:00+0000")
    assert newest_adapter(store) == new.id
    assert (adapter_kind(store, old), adapter_kind(store, new)) == ("agent", "cot")


@pytest.fixture
def fake_evaluation(monkeypatch):
    """reevaluate_flow's collaborators replaced: the evaluate stage records its calls, artifacts are captured."""
    calls, published = [], []

    def run_stage_flow(stage, cfg, home, options):
        assert stage == "evaluate"
        calls.append((cfg, options.adapters))
        store = ArtifactStore(home)
        return {"evaluate": store.begin("evaluate", {"n": len(calls)}, [r.id for r in options.adapters.values()]).finish()}

    monkeypatch.setattr("flows.deployments.run_stage_flow", run_stage_flow)
    monkeypatch.setattr("flows.deployments.create_markdown_artifact", lambda **kw: published.append(kw))
    return calls, published


def test_reevaluate_flow_evaluates_the_newest_adapter(tmp_path, fake_evaluation):
    calls, published = fake_evaluation
    store = ArtifactStore(tmp_path)
    store_adapter(store, "agent", "2025-01-01T00:00:00+0000")
    newest = store_adapter(store, "agent", "2025-06-01T00:00:00+0000")
    results = reevaluate_flow.fn(cfg=demo(), home=str(tmp_path))
    assert list(results) == [newest.id]
    [(cfg, adapters)] = calls
    assert adapters == {"agent": newest}
    assert {m.model for m in cfg.evaluate.methods} == {"agent_student"}
    [artifact] = published
    assert artifact["key"] == "reevaluate-latest"
    assert newest.id in artifact["markdown"] and results[newest.id].id in artifact["markdown"]


def test_reevaluate_flow_evaluates_the_listed_adapters(tmp_path, fake_evaluation):
    calls, _ = fake_evaluation
    store = ArtifactStore(tmp_path)
    first = store_adapter(store, "agent", "2025-01-01T00:00:00+0000")
    store_adapter(store, "agent", "2025-06-01T00:00:00+0000")
    cfg = demo(f"reevaluate.adapters=['{first.id[:8]}']")
    assert list(reevaluate_flow.fn(cfg=cfg, home=str(tmp_path))) == [first.id]
    assert calls[0][1] == {"agent": first}
    data_id = store.list("sft")[0]["id"]
    with pytest.raises(ValueError, match=f"{data_id!r} is a sft artifact, not an adapter"):
        reevaluate_flow.fn(cfg=demo(f"reevaluate.adapters=['{data_id}']"), home=str(tmp_path))


# ----------------------------------------------------------------------------- server script

def test_server_env_puts_home_and_database_under_the_artifact_root(tmp_path):
    env = server_env(tmp_path, 4321, {"PATH": "/bin"})
    assert env["PREFECT_HOME"] == str(tmp_path / "prefect-server")
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"] == f"sqlite+aiosqlite:///{tmp_path}/prefect-server/prefect.db"
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4321/api"
    postgres = "postgresql+asyncpg://prefect:secret@db:5432/prefect"
    assert server_env(tmp_path, 4321, {"PREFECT_API_DATABASE_CONNECTION_URL": postgres})[
        "PREFECT_API_DATABASE_CONNECTION_URL"] == postgres
    client = client_env(tmp_path, "http://127.0.0.1:4321/api", {"PYTHONPATH": "/x"})
    assert client["PREFECT_API_URL"] == "http://127.0.0.1:4321/api" and client["DISTILLERY_HOME"] == str(tmp_path)
    assert client["PYTHONPATH"] == f"{ROOT}{os.pathsep}/x"


def test_server_options_reach_serve_unchanged(tmp_path):
    profile = tmp_path / "p.yaml"
    argv = serve_argv(profile, ["reevaluate.cron=5 1 * * *", "rollout.limit=2"], no_schedule=True)
    args = build_parser().parse_args(["serve", *argv])
    assert (args.config, args.overrides, args.no_schedule) == (profile.resolve(),
                                                               ["reevaluate.cron=5 1 * * *", "rollout.limit=2"], True)
    assert serve_argv(None, [], False) == []


# ----------------------------------------------------------------------------- a real Prefect server

SCRIPT_ACTION = 'Thought: I answer directly.\nCode:\n```py\nfinal_answer("42")\n```<end_code>'
CRON, TIMEZONE = "17 4 * * *", "Europe/Paris"


def tiny_overrides(script: Path) -> list[str]:
    """The demo profile shrunk to seconds per stage: scripted teacher and student, a 1-step LoRA run."""
    return [
        "index.corpus.limit=20", "sandbox.workers=1",
        "teacher.kind=scripted", f"teacher.script={script}", "student.kind=scripted", f"student.script={script}",
        "rollout.limit=2", "rollout.num_parts=1", "sft.require_correct=false",
        "train.max_steps=1", "train.max_length=256", "train.per_device_batch_size=1", "train.grad_accum=1",
        "train.lora.r=4", "train.lora.alpha=8", "evaluate.limit=2", "evaluate.num_shards=1",
        "evaluate.max_workers=1",
    ]


class Stack:
    def __init__(self, home: Path, api_url: str, log: Path, tiny: dict):
        self.home, self.api_url, self.log, self.tiny = home, api_url, log, tiny

    def settings(self):
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings(updates={PREFECT_API_URL: self.api_url})

    def query(self, sql: str) -> list[dict]:
        result = subprocess.run([sys.executable, "-m", "flows.cli", "--home", str(self.home), "query", sql,
                                 "--format", "json"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                                check=False)
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    def tail(self) -> str:
        return "\n".join(tail(self.log, 40))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """``distillery server`` on a free loopback port with a fresh SQLite database; always stopped."""
    base = tmp_path_factory.mktemp("stack")
    home, log, script = base / "home", base / "server.log", base / "script.json"
    script.write_text(json.dumps([SCRIPT_ACTION] * 400))
    port = free_port()
    command = [sys.executable, "-m", "flows.cli", "--home", str(home), "server", "--port", str(port),
               "--set", f"reevaluate.cron={CRON}", "--set", f"reevaluate.timezone={TIMEZONE}"]
    started = time.monotonic()
    # A session of its own: the teardown stops all of it (server, serve, flow runs).
    server = start_service(command, log)
    try:
        api_url = f"http://127.0.0.1:{port}/api"
        server.wait_until(lambda: all(registered(api_url, f"{name}/{DEPLOYMENT_NAME}") for name in FLOWS), 420,
                          what="register the deployments", interval_s=2.0)
        print(f"\nserver up and deployments registered in {time.monotonic() - started:.0f} s")
        tiny = demo(*tiny_overrides(script)).model_dump(mode="json")
        yield Stack(home, api_url, log, tiny)
    finally:
        stop(server, timeout_s=90)


@pytest.fixture(scope="module")
def pipeline_run(stack):
    """One run of the pipeline deployment on the tiny config (its adapter is what the re-evaluation reads)."""
    from prefect.deployments import run_deployment

    started = time.monotonic()
    with stack.settings():
        run = run_deployment(f"pipeline/{DEPLOYMENT_NAME}", parameters={"cfg": stack.tiny, "home": str(stack.home)},
                             timeout=1200, poll_interval=3)
    print(f"\npipeline deployment run: {time.monotonic() - started:.0f} s")
    assert run.state.is_completed(), f"{run.state}\n{stack.tail()}"
    return run


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.shares_cores
@pytest.mark.timeout(1800)  # server start (420 s) + the run (1200 s): longer than the suite's default
def test_pipeline_deployment_runs_on_a_real_server(stack, pipeline_run):
    assert pipeline_run.parameters["cfg"]["rollout"]["limit"] == 2
    rows = stack.query("select stage, count(*) as n from artifacts group by stage")
    assert {r["stage"]: r["n"] for r in rows} == {"index": 1, "rollout": 1, "sft": 1, "train": 1,
                                                    "evaluate": 1}
    metrics = stack.query("select method, dataset, n from metrics")
    assert {(m["method"], m["dataset"]) for m in metrics} == {
        (method["name"], dataset["name"]) for method in stack.tiny["evaluate"]["methods"]
        for dataset in stack.tiny["evaluate"]["datasets"]}
    assert all(m["n"] == 2 for m in metrics)  # evaluate.limit=2 questions per dataset


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.shares_cores
def test_reevaluation_schedule_is_visible_with_the_configured_cron(stack):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with stack.settings(), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"reevaluate/{DEPLOYMENT_NAME}")
        [schedule] = deployment.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (CRON, TIMEZONE, True)
        assert "PipelineConfig" in deployment.parameter_openapi_schema["definitions"]
        # The server's scheduler turns the cron into upcoming runs (this failed with SQLAlchemy 2.1).
        deadline, runs = time.monotonic() + 180, []
        while time.monotonic() < deadline and not runs:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
            runs = [r for r in runs if r.state_type.value == "SCHEDULED"]
            time.sleep(0 if runs else 5)
    assert runs, "the scheduler made no scheduled runs of the reevaluate deployment"
    for run in runs:
        local = run.expected_start_time.astimezone(ZoneInfo(TIMEZONE))
        assert (local.hour, local.minute) == (4, 17)


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.shares_cores
@pytest.mark.timeout(1800)  # the pipeline run (its fixture) when this test runs first or alone
def test_reevaluate_deployment_evaluates_the_newest_adapter(stack, pipeline_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.deployments import run_deployment

    [adapter] = stack.query("select id from artifacts where stage = 'train'")
    started = time.monotonic()
    with stack.settings():
        run = run_deployment(f"reevaluate/{DEPLOYMENT_NAME}", parameters={"cfg": stack.tiny, "home": str(stack.home)},
                             timeout=900, poll_interval=3)
        print(f"\nreevaluate deployment run: {time.monotonic() - started:.0f} s")
        assert run.state.is_completed(), f"{run.state}\n{stack.tail()}"
        with get_client(sync_client=True) as client:
            [artifact] = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["reevaluate-latest"])))
    assert adapter["id"] in artifact.data
    evals = stack.query("select id, parents from artifacts where stage = 'evaluate'")
    assert len(evals) == 2 and all(adapter["id"] in e["parents"] for e in evals)
    methods = stack.query("select distinct method from metrics")
    assert {m["method"] for m in methods} >= {"agent-distilled", "agent-distilled+sag"}


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.shares_cores
def test_deployments_register_in_a_process_work_pool(stack):
    """Last in the module (make test keeps a module on one xdist worker, in file order): it moves the served
    deployments into the pool, and its registration carries the default re-evaluation schedule."""
    from prefect.client.orchestration import get_client

    env = project_env(PREFECT_API_URL=stack.api_url)
    result = subprocess.run([sys.executable, "-m", "flows.cli", "--home", str(stack.home), "serve", "--pool",
                             "distillery-test"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert f"registered {len(FLOWS)} deployments in work pool 'distillery-test'" in result.stdout
    with stack.settings(), get_client(sync_client=True) as client:
        assert client.read_work_pool("distillery-test").type == "process"
        for name in FLOWS:
            assert client.read_deployment_by_name(f"{name}/{DEPLOYMENT_NAME}").work_pool_name == "distillery-test"
