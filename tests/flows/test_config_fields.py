"""Every config field is read somewhere: a field that no code reads would still change artifact ids while
doing nothing. A field counts as read when the project's code outside its declaration uses it as an
attribute (``cfg.name``), a keyword (``name=``) or a key (``["name"]``)."""

import re
from pathlib import Path

from pydantic import BaseModel

from flows.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "tasks", "agent_runtime", "questions", "retrieval", "storage", "training", "evaluation")


def config_models(model: type[BaseModel], seen: dict | None = None) -> dict[str, type[BaseModel]]:
    seen = {} if seen is None else seen
    seen[model.__name__] = model
    for field in model.model_fields.values():
        annotation = field.annotation
        candidates = getattr(annotation, "__args__", ()) + (annotation,)
        for candidate in candidates:
            if isinstance(candidate, type) and issubclass(candidate, BaseModel) and candidate.__name__ not in seen:
                config_models(candidate, seen)
    return seen


def test_every_config_field_is_read_by_some_code():
    source = "\n".join(path.read_text() for package in PACKAGES for path in (ROOT / package).rglob("*.py"))
    models = config_models(PipelineConfig)
    assert {"BackendConfig", "AgentConfig", "SagConfig", "TrainConfig", "IndexConfig", "CorpusConfig",
            "DatasetConfig", "MethodConfig", "PrefixConfig", "RolloutConfig"} <= set(models)
    unread = []
    for name, model in sorted(models.items()):
        for field in model.model_fields:
            used = re.search(rf"\.{field}\b|\b{field}=|\[[\"']{field}[\"']\]", source)
            if used is None:
                unread.append(f"{name}.{field}")
    assert unread == []


def test_an_old_profile_with_a_removed_field_is_one_clear_error(tmp_path):
    import pytest

    from flows.settings import ConfigError, load_config

    old = tmp_path / "old.yaml"
    old.write_text("prefixes:\n  enabled: true\n")
    with pytest.raises((ConfigError, ValueError), match="enabled"):
        load_config(PipelineConfig, old)
