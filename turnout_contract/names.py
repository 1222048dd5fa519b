"""The one rule for names that come from outside: model names (and version numbers).

A model name becomes a directory of the repository, a file of the policy store, a Ray
Serve application's name and a metric label, so every entry point (HTTP and gRPC paths and
messages, the admin API, the CLI, feedback, the sidecar, directories found on disk) checks
it with :func:`check_model_name` before it touches any of them. The rule is Triton's in
spirit: letters, digits, ``_``, ``-`` and ``.``, not starting with a dot (no ``.``, ``..`` or
hidden files), at most :data:`MAX_NAME_LENGTH` characters. :func:`contained` resolves a
path built from a name and refuses one outside its root (symbolic links included).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

__all__ = ["MAX_NAME_LENGTH", "check_model_name", "contained", "is_model_name"]

MAX_NAME_LENGTH: Final = 128
_NAME: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def is_model_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and _NAME.fullmatch(name) is not None


def check_model_name(name: str) -> str:
    """``name`` when it is a valid model name; ValueError saying why not."""
    if not isinstance(name, str) or not name:
        raise ValueError("model name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"model name is {len(name)} characters long, at most {MAX_NAME_LENGTH}")
    if not is_model_name(name):
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise ValueError(
            f"model name {shown!r} is not allowed: use letters, digits, '_', '-' and '.', "
            "not starting with '.'"
        )
    return name


def contained(root: Path, *parts: str) -> Path:
    """``root / parts...`` resolved; ValueError when it lies outside ``root``."""
    base = root.resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise ValueError(f"{'/'.join(parts)!r} resolves outside {root}")
    return path
