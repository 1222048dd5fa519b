"""``turnout``: the command line, composed of the gateway's commands and the monitor's."""

from __future__ import annotations

import argparse
import sys

from gateway import __version__
from gateway.cli import add_gateway_commands
from monitor.cli import add_monitor_commands

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turnout", description=__doc__)
    parser.add_argument("--version", action="version", version=f"turnout {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_gateway_commands(commands)
    add_monitor_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
