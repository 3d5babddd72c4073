"""Loading a profile: YAML file → typed pipeline config, with ``--set dotted.key=value`` overrides.

Errors are ``ConfigError`` with one line that names the file (and line) or the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ValidationError

from common.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PROFILE = CONFIG_DIR / "demo.yaml"
Profile = Literal["demo", "cpu-study", "paper"]
"""The shipped profiles by name: ``configs/<name>.yaml`` (a test keeps this list equal to the files)."""


class ConfigError(UserError, ValueError):
    """A profile or an override is invalid."""


def read_yaml(path: Path) -> dict:
    """The mapping in a YAML file; a missing file or bad syntax names the file and line."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: malformed YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of stage names to settings")
    return data


def apply_override(data: dict, model: type[BaseModel], assignment: str) -> None:
    """Apply ``a.b.c=value`` to ``data`` in place; the key must exist in ``model``'s fields."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects dotted.key=value, got {assignment!r}")
    parts = key.strip().split(".")
    current_model: type[BaseModel] | None = model
    target = data
    for depth, part in enumerate(parts):
        fields = current_model.model_fields if current_model else None
        if fields is not None and part not in fields:
            known = ", ".join(sorted(fields))
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(f"unknown config key {key!r}: {part!r} is not a field of {where} (known: {known})")
        if depth == len(parts) - 1:
            target[part] = yaml.safe_load(raw) if raw.strip() else ""
            return
        annotation = fields[part].annotation if fields is not None else None
        current_model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if current_model is None and fields is not None:
            raise ConfigError(f"config key {key!r}: {'.'.join(parts[:depth + 1])} is not a section")
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"config key {key!r}: {'.'.join(parts[:depth + 1])} is not a mapping in the file")


def profile_path(profile: Profile) -> Path:
    """The YAML file of a shipped profile, under the repository's configs/ whatever the working directory."""
    return CONFIG_DIR / f"{profile}.yaml"


def load_config(model: type[BaseModel], path: Path | None = None, overrides: list[str] = ()) -> BaseModel:
    """Read ``path`` (default: the demo profile), apply overrides, validate into ``model``."""
    path = Path(path) if path else DEFAULT_PROFILE
    data = read_yaml(path)
    for assignment in overrides:
        apply_override(data, model, assignment)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{path}: {location}: {first['msg']}{more}") from None
