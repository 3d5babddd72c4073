"""Every shipped profile loads into the pipeline config, and the paper profile sets what the paper used."""

from pathlib import Path
from typing import get_args

import pytest
import yaml

from flows.config import PipelineConfig
from flows.settings import CONFIG_DIR, Profile, load_config, profile_path

PROFILES = sorted(CONFIG_DIR.glob("*.yaml"))


def test_profiles_are_shipped():
    assert {p.name for p in PROFILES} >= {"demo.yaml", "paper.yaml"}


def test_the_profile_choice_is_the_shipped_files_whatever_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs = Path(__file__).resolve().parents[2] / "configs"
    assert {profile_path(name) for name in get_args(Profile)} == set(configs.glob("*.yaml"))


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_every_profile_loads_and_every_field_is_known(path: Path):
    cfg = load_config(PipelineConfig, path)
    # extra="forbid" everywhere: a field the code does not use would have failed validation above.
    assert cfg.train.base_model == cfg.student.model
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= set(PipelineConfig.model_fields)


def test_paper_profile_is_the_papers_setup():
    cfg = load_config(PipelineConfig, CONFIG_DIR / "paper.yaml")
    assert cfg.teacher.kind == "vllm" and cfg.teacher.model == "Qwen/Qwen2.5-32B-Instruct"
    assert cfg.teacher.tensor_parallel_size == 4
    assert cfg.index.embedder == "intfloat/e5-base-v2" and cfg.rollout.use_prefixes
    assert (cfg.train.lora.r, cfg.train.lora.alpha, cfg.train.learning_rate) == (64, 128, 2e-4)
    assert (cfg.evaluate.sag.n, cfg.evaluate.sag.temperature) == (8, 0.4)
    assert len(cfg.evaluate.datasets) == 8


def test_demo_profile_uses_only_embedded_models_and_the_papers_filter():
    cfg = load_config(PipelineConfig, CONFIG_DIR / "demo.yaml")
    assert (cfg.teacher.kind, cfg.teacher.model) == ("llamacpp", "qwen2.5-coder-1.5b-instruct")
    assert cfg.student.model == cfg.train.base_model == "smollm2-135m-instruct"
    assert cfg.sft.require_correct
    assert {"teacher", "student", "agent_student"} <= {m.model for m in cfg.evaluate.methods}
    assert cfg.index.embedder == "minilm-l6-v2" and cfg.index.corpus.source == "vital-articles"
