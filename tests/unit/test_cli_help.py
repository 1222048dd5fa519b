"""Every ``turnout`` command and subcommand answers ``--help`` with its usage and exit 0."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from turnout.cli import build_parser


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.extend(_commands(sub, (*path, name)))
    return found


COMMANDS = _commands(build_parser())


def test_the_walk_finds_the_nested_commands() -> None:
    assert ("traffic", "promote") in COMMANDS and ("monitor", "profile") in COMMANDS
    assert len(COMMANDS) > 15


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "turnout")
def test_help_exits_0_with_its_usage(command: tuple[str, ...]) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    assert out.getvalue().startswith(f"usage: turnout {' '.join(command)}".rstrip())
