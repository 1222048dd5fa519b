"""``turnout rollout`` and ``turnout experiment``: automated rollouts and A/B experiments,
over the REST admin API."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from gateway.admin.cli import CliError, add_common_flags, call_admin, model_name_argument

__all__ = ["add_experiment_commands", "add_rollout_commands", "print_rollout"]

FINAL_PHASES = ("promoted", "rolled_back", "aborted")


def _steps(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"steps are percentages, e.g. 5,25,50,100; got {text!r}"
        ) from None


def _start(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"canary": args.canary, "dry_run": args.dry_run}
    if args.config:
        try:
            config = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise CliError(f"cannot read {args.config}: {exc}") from None
        if not isinstance(config, dict):
            raise CliError(f"{args.config}: expected a mapping of rollout settings")
        body["config"] = config
    for key in ("steps", "step_seconds", "min_requests"):
        value = getattr(args, key)
        if value is not None:
            body[key] = value
    document: dict[str, Any] = call_admin(args, "POST", f"models/{args.model}/rollout", body)
    return document


def _status(args: argparse.Namespace) -> dict[str, Any]:
    document: dict[str, Any] = call_admin(args, "GET", f"models/{args.model}/rollout")
    return document


def _act(args: argparse.Namespace) -> dict[str, Any]:
    path = f"models/{args.model}/rollout/{args.rollout_command}"
    document: dict[str, Any] = call_admin(args, "POST", path, {})
    return document


def print_rollout(document: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    weights = " ".join(f"v{v}={w}%" for v, w in document["weights"].items())
    steps = ",".join(str(s) for s in document["steps"])
    console.print(
        f"[bold]{document['model']}[/bold] rollout of v{document['canary']} over "
        f"v{document['stable']}: [bold]{document['phase']}[/bold], step {document['step'] + 1} "
        f"of [{steps}], {weights}, {document.get('step_elapsed_s', 0):.0f} s in this step"
    )
    if document.get("reason"):
        console.print(f"  {document['reason']}")
    table = Table()
    for column in ("gate", "decision", "statistic", "evidence"):
        table.add_column(column)
    colour = {"pass": "green", "hold": "yellow", "fail": "red"}
    for gate in document.get("gates") or []:
        decision = gate["decision"]
        table.add_row(
            gate["name"],
            f"[{colour.get(decision, 'white')}]{decision}[/]",
            gate["statistic"],
            gate["detail"],
        )
    console.print(table)


def _run(handler: Any, args: argparse.Namespace) -> int:
    try:
        while True:
            document = handler(args)
            if args.json:
                print(json.dumps(document, indent=2))
            else:
                print_rollout(document)
            if not getattr(args, "watch", False) or document["phase"] in FINAL_PHASES:
                return 0
            time.sleep(args.interval)
            handler = _status
    except CliError as exc:
        print(f"turnout: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def add_rollout_commands(commands: Any) -> None:
    rollout = commands.add_parser("rollout", help="automated, metric-gated canary rollouts")
    actions = rollout.add_subparsers(dest="rollout_command", required=True)

    start = actions.add_parser("start", help="roll a version out in gated steps")
    start.add_argument("model", type=model_name_argument)
    start.add_argument("--canary", type=int, required=True, help="the version to roll out")
    start.add_argument("--steps", type=_steps, help="canary weights, e.g. 5,25,50,100")
    start.add_argument("--step-seconds", type=float, help="shortest time a step lasts")
    start.add_argument("--min-requests", type=int, help="fewest canary requests per step")
    start.add_argument("--config", help="rollout.yaml: gates, margins, alpha, webhooks")
    start.add_argument("--dry-run", action="store_true", help="validate and show the plan")
    start.add_argument("--watch", action="store_true", help="follow it until it ends")
    start.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    add_common_flags(start)
    start.set_defaults(func=lambda args: _run(_start, args))

    status = actions.add_parser("status", help="phase, step, weights and every gate's evidence")
    status.add_argument("model", type=model_name_argument)
    status.add_argument("--watch", action="store_true", help="refresh until the rollout ends")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    add_common_flags(status)
    status.set_defaults(func=lambda args: _run(_status, args))

    for name, help_text in (
        ("pause", "hold the rollout where it is"),
        ("resume", "continue a paused rollout (the step's evidence starts again)"),
        ("abort", "back to the stable version at 100%%"),
        ("promote", "the canary at 100%% now"),
    ):
        parser = actions.add_parser(name, help=help_text)
        parser.add_argument("model", type=model_name_argument)
        add_common_flags(parser)
        parser.set_defaults(func=lambda args: _run(_act, args))


def _experiment(args: argparse.Namespace) -> dict[str, Any]:
    path = f"models/{args.model}/experiment"
    action = args.experiment_command
    if action == "start":
        body: dict[str, Any] = {"arms": args.arms, "metric": args.metric, "alpha": args.alpha}
        if args.split:
            body["split"] = args.split
        document: dict[str, Any] = call_admin(args, "POST", path, body)
    elif action == "stop":
        winner = {"winner": args.winner} if args.winner is not None else {}
        document = call_admin(args, "POST", f"{path}/stop", winner)
    else:
        document = call_admin(args, "GET", path)
    return document


def print_experiment(document: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    srm = document.get("srm") or {}
    console.print(
        f"[bold]{document['model']}[/bold] experiment ({document['metric']}): "
        f"[bold]{document['phase']}[/bold], decision [bold]{document['decision']}[/bold]; "
        f"sample ratio: {srm.get('decision', 'no assignments yet')}"
    )
    table = Table()
    for column in ("arm", "share", "assigned", "n", document["metric"], "lift", "always-valid CI"):
        table.add_column(column)
    for arm in document["arms"]:
        lift = arm.get("lift") or {}
        value = arm.get(document["metric"])
        ci = lift.get("always_valid_ci")
        table.add_row(
            f"v{arm['version']}" + (" (control)" if arm["control"] else ""),
            f"{arm['share']}%",
            str(arm["assigned"]),
            str(arm["n"]),
            "-" if value is None else f"{value:.4f}",
            "-" if not lift else f"{lift['difference']:+.4f} ({lift['decision']})",
            "-" if not ci else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]",
        )
    console.print(table)


def _run_experiment(args: argparse.Namespace) -> int:
    try:
        document = _experiment(args)
    except CliError as exc:
        print(f"turnout: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print_experiment(document)
    return 0


def add_experiment_commands(commands: Any) -> None:
    experiment = commands.add_parser("experiment", help="A/B experiments with always-valid lift")
    actions = experiment.add_subparsers(dest="experiment_command", required=True)
    start = actions.add_parser("start", help="split traffic over arms (sticky by routing key)")
    start.add_argument("model", type=model_name_argument)
    start.add_argument("--arms", type=_steps, required=True, help="versions; the first is control")
    start.add_argument("--split", type=_steps, help="percent per arm, e.g. 50,50 (default even)")
    start.add_argument("--metric", choices=["accuracy", "reward"], default="accuracy")
    start.add_argument("--alpha", type=float, default=0.05)
    status = actions.add_parser("status", help="per arm n, metric, lift, sample-ratio check")
    status.add_argument("model", type=model_name_argument)
    stop = actions.add_parser("stop", help="end it: all traffic to the winner (default control)")
    stop.add_argument("model", type=model_name_argument)
    stop.add_argument("--winner", type=int)
    for parser in (start, status, stop):
        add_common_flags(parser)
        parser.set_defaults(func=_run_experiment)
