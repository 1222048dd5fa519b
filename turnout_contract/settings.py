"""The layered settings loader both processes use, and its one error.

Precedence, lowest first: a settings class's defaults, one YAML file, its environment
variables (the class's ``env_prefix``), explicit non-None overrides (command-line flags).
Errors name the layer and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings

__all__ = ["SettingsError", "error_key", "load_layered", "read_yaml"]

SettingsT = TypeVar("SettingsT", bound=BaseSettings)


class SettingsError(ValueError):
    """A configuration file or value is invalid; the message names the key."""


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file's top-level mapping (empty for an empty file)."""
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"{path}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise SettingsError(f"{path}: expected a mapping at the top level")
    return loaded


def error_key(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a dotted key."""
    return ".".join(str(p) for p in loc) or "(root)"


def _describe(exc: ValidationError, source: str) -> SettingsError:
    problems = "; ".join(f"{error_key(err['loc'])}: {err['msg']}" for err in exc.errors())
    return SettingsError(f"{source}: {problems}")


def load_layered(
    cls: type[SettingsT], config_file: Path | None, env_label: str, overrides: dict[str, Any]
) -> SettingsT:
    """Defaults < YAML file < environment < explicit (non-None) overrides, for any settings
    class; errors name the layer and the key."""
    from_file = read_yaml(config_file) if config_file else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        env_only = cls()
    except ValidationError as exc:
        raise _describe(exc, f"{env_label} environment") from exc
    env_set = {name: getattr(env_only, name) for name in env_only.model_fields_set}
    try:
        return cls(**{**from_file, **env_set, **given})
    except ValidationError as exc:
        raise _describe(exc, str(config_file or "settings")) from exc
