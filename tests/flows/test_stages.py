"""The stage registry is the one list of stages: a stage added to it is planned, gets a CLI command and runs
as a Prefect flow of its own name, with nothing else written for it but its builder."""

import pytest

from flows import stages
from flows.cli import build_parser, main
from flows.plans import plan_pipeline
from flows.stages import Stage, stage_names
from storage.store import ArtifactStore
from tasks.artifacts import build_artifact


def test_the_registry_names_the_pipeline_stages_in_order_and_each_builder_resolves():
    assert stage_names() == ("index", "prefixes", "rollout", "sft", "train", "opd", "evaluate")
    for entry in stages.STAGES:
        assert callable(entry.build()), entry.name
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"run", *stage_names()} <= set(commands)
    with pytest.raises(KeyError, match="no stage 'toy'; the stages are index, prefixes"):
        stages.stage("toy/agent")


def count_to_three(plan, cfg, inputs, kind, options):
    """The toy stage's builder: the index it reads, and the numbers 1 2 3."""
    def write(artifact):
        (artifact.path / "count.txt").write_text(f"{inputs['index'].id} 1 2 3\n")
        return {"numbers": 3}, {"kind": kind}

    return build_artifact(plan, write, "select * from artifacts where id = '{id}'")


TOY = Stage("toy", "count to three after the index", code=("storage",),
            inputs=lambda cfg, kind: ("index",), identity=lambda cfg, kind, inputs: {"to": 3},
            check=lambda cfg, kind: None, builder=f"{__name__}:count_to_three")


@pytest.mark.usefixtures("prefect_harness")
def test_a_registered_stage_runs_through_the_plan_the_cli_and_its_flow(home, monkeypatch, capsys, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.config import PipelineConfig
    from flows.settings import load_config

    monkeypatch.setattr(stages, "STAGES", (*stages.STAGES, TOY))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "1", "title": "Mars", "text": "Mars is the fourth planet."}\n')
    config = tmp_path / "toy.yaml"
    config.write_text(f"index:\n  corpus:\n    source: {corpus}\n")
    cfg = load_config(PipelineConfig, config)
    plan = plan_pipeline(ArtifactStore(home), cfg, ("toy",))
    assert list(plan.stages) == ["index", "toy"] and plan["toy"].inputs == ("index",)
    assert plan.missing("index") and plan.missing("toy")

    assert main(["--home", str(home), "toy", "--config", str(config)]) == 0
    toy = plan.ref("toy")
    assert f"toy {toy.id}" in capsys.readouterr().out
    assert (toy.path / "count.txt").read_text() == f"{plan.ref('index').id} 1 2 3\n"
    manifest = ArtifactStore(home).manifest(toy)
    assert manifest["parents"] == [plan.ref("index").id] and manifest["row_counts"] == {"numbers": 3}
    with get_client(sync_client=True) as client:  # the stage ran as the flow named after it
        assert client.read_flow_by_name("toy").name == "toy"

    # Built: the same command answers from the store, without a flow.
    assert main(["--home", str(home), "toy", "--config", str(config)]) == 0
    assert "(cached: toy with this config already exists)" in capsys.readouterr().err
