"""``turnout traffic ...`` and ``turnout models ...``: the admin API from a terminal.

The CLI finds a gateway on this machine through ``STATE_DIR/gateway.json`` and its token in
``STATE_DIR/tokens.json``; ``--url`` and ``--token`` (or ``TURNOUT_URL``/``TURNOUT_TOKEN``)
point it anywhere else. Tables by default, ``--json`` for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from turnout_contract.address import gateway_state_dir
from turnout_contract.names import check_model_name

__all__ = [
    "CliError",
    "add_admin_commands",
    "add_common_flags",
    "call_admin",
    "model_name_argument",
]


class CliError(Exception):
    pass


def model_name_argument(value: str) -> str:
    """argparse ``type``: a valid model name, or a usage error naming the rule."""
    try:
        return check_model_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir) if args.state_dir else gateway_state_dir()


def _endpoint(args: argparse.Namespace) -> tuple[str, str]:
    url = args.url or os.environ.get("TURNOUT_URL")
    token = args.token or os.environ.get("TURNOUT_TOKEN")
    state = _state_dir(args)
    if not url:
        try:
            url = json.loads((state / "gateway.json").read_text())["http"]
        except (OSError, ValueError, KeyError):
            raise CliError(
                f"no running gateway found in {state} (start `turnout serve`, or pass --url)"
            ) from None
    if not token:
        try:
            tokens = json.loads((state / "tokens.json").read_text())["tokens"]
            token = next(t["token"] for t in tokens if t["role"] == "admin")
        except (OSError, ValueError, KeyError, StopIteration):
            raise CliError(f"no admin token in {state}/tokens.json (pass --token)") from None
    return str(url).rstrip("/"), str(token)


def call_admin(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    url, token = _endpoint(args)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{url}/admin/v1/{path}",
        data=data,
        method=method,
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    context = ssl.create_default_context(cafile=args.cacert) if url.startswith("https") else None
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc)["error"]
        except (ValueError, KeyError):
            message = exc.reason
        raise CliError(f"{exc.code}: {message}") from None
    except urllib.error.URLError as exc:
        raise CliError(f"cannot reach the gateway at {url}: {exc.reason}") from None


def _print_status(statuses: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="traffic")
    for column in (
        "model",
        "revision",
        "kind",
        "weights",
        "standby",
        "shadow",
        "explicit",
        "loaded",
    ):
        table.add_column(column)
    for s in statuses:
        weights = " ".join(f"v{v}={w}%" for v, w in s["weights"].items())
        shadow = s["shadow"]
        shadow_text = f"v{shadow['version']} {shadow['percent']:g}%" if shadow else "-"
        for version, stats in s.get("shadow_stats", {}).items():
            rate = stats["exact_match_rate"]
            if rate is not None:
                shadow_text += f" (v{version}: {rate:.1%} exact, {stats['requests']} req)"
        table.add_row(
            s["model"],
            str(s["revision"]),
            s["kind"],
            weights,
            f"v{s['standby']}" if s["standby"] else "-",
            shadow_text,
            "yes" if s["allow_explicit_version"] else "no",
            ", ".join(f"v{v}" for v in s["loaded_versions"]),
        )
    Console().print(table)


def _print_history(entries: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="history")
    for column in ("revision", "time", "actor", "operation", "weights"):
        table.add_column(column)
    for entry in entries:
        new = entry["new"]
        table.add_row(
            str(entry["revision"]),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["time"])),
            entry["actor"],
            entry["operation"],
            " ".join(f"v{v}={w}%" for v, w in new["weights"].items()),
        )
    Console().print(table)


def _change(args: argparse.Namespace, operation: str, **fields: Any) -> Any:
    body: dict[str, Any] = {"op": operation, **fields}
    if args.if_revision is not None:
        body["if_revision"] = args.if_revision
    return call_admin(args, "POST", f"models/{args.model}/traffic", body)


def _parse_weights(pairs: list[str]) -> dict[str, int]:
    weights = {}
    for pair in pairs:
        version, _, weight = pair.partition("=")
        if not version.isdigit() or not weight.lstrip("-").isdigit():
            raise CliError(f"weights are VERSION=PERCENT, e.g. 1=90 2=10; got {pair!r}")
        weights[version] = int(weight)
    return weights


def _traffic(args: argparse.Namespace) -> Any:
    action = args.traffic_command
    if action == "status":
        if args.model:
            return [call_admin(args, "GET", f"models/{args.model}/traffic")]
        return call_admin(args, "GET", "models")["models"]
    if action == "history":
        return call_admin(args, "GET", f"models/{args.model}/traffic/history")["history"]
    if action == "set":
        fields: dict[str, Any] = {"weights": _parse_weights(args.weights)}
        if args.standby is not None:
            fields["standby"] = args.standby
        if args.explicit is not None:
            fields["allow_explicit_version"] = args.explicit == "allow"
        return [_change(args, "set", **fields)]
    if action == "switch":
        return [_change(args, "switch")]
    if action == "promote":
        return [_change(args, "promote", version=args.version)]
    if action == "rollback":
        return [_change(args, "rollback")]
    if action == "fault":
        path = f"models/{args.model}/versions/{args.version}/fault"
        if args.clear:
            return [call_admin(args, "DELETE", path)]
        fault = {
            "abort_percent": args.abort_percent,
            "abort_status": args.abort_status,
            "delay_ms": args.delay_ms,
            "delay_percent": args.delay_percent,
        }
        return [call_admin(args, "PUT", path, fault)]
    if action == "shadow":
        if args.clear:
            return [_change(args, "clear_shadow")]
        if args.version is None:
            raise CliError("give a shadow VERSION, or --clear")
        return [_change(args, "shadow", version=args.version, percent=args.percent)]
    raise CliError(f"unknown traffic command {action}")


def _models(args: argparse.Namespace) -> Any:
    path = f"models/{args.model}/versions/{args.version}/{args.models_command}"
    return call_admin(args, "POST", path, {})


def _run(handler: Any, args: argparse.Namespace) -> int:
    try:
        result = handler(args)
    except CliError as exc:
        print(f"turnout: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                result[0]
                if isinstance(result, list)
                and len(result) == 1
                and getattr(args, "traffic_command", "") not in ("status", "history")
                else result,
                indent=2,
            )
        )
    elif getattr(args, "traffic_command", None) == "history":
        _print_history(result)
    elif isinstance(result, list):
        _print_status(result)
    else:
        print(json.dumps(result, indent=2))
    return 0


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--url", help="gateway HTTP address (default: found in the state dir)")
    parser.add_argument("--token", help="admin bearer token (default: the state dir's)")
    parser.add_argument("--state-dir", help="state directory of the local gateway")
    parser.add_argument(
        "--cacert", help="CA certificate (PEM) the gateway's HTTPS certificate is checked against"
    )


def add_admin_commands(commands: Any) -> None:
    traffic = commands.add_parser("traffic", help="show and change traffic policies")
    actions = traffic.add_subparsers(dest="traffic_command", required=True)

    def action(name: str, help_text: str, model_required: bool = True) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        parser.add_argument(
            "model", nargs=None if model_required else "?", type=model_name_argument
        )
        add_common_flags(parser)
        if name not in ("status", "history"):
            parser.add_argument("--if-revision", type=int, help="apply only at this revision")
        parser.set_defaults(func=lambda args: _run(_traffic, args))
        return parser

    action("status", "policy, revision and shadow agreement per model", model_required=False)
    action("history", "the audit log of a model's changes")
    set_parser = action("set", "set weights, e.g. 1=90 2=10")
    set_parser.add_argument("weights", nargs="+", metavar="VERSION=PERCENT")
    set_parser.add_argument("--standby", type=int, help="blue-green: the warm standby version")
    set_parser.add_argument(
        "--explicit", choices=["allow", "deny"], help="may requests name a version"
    )
    action("switch", "blue-green: swap active and standby")
    promote = action("promote", "send 100%% to a version")
    promote.add_argument("version", type=int)
    action("rollback", "restore the previous revision's policy")
    shadow = action("shadow", "mirror a share of requests to a version")
    shadow.add_argument("version", type=int, nargs="?")
    shadow.add_argument("--percent", type=float, default=10.0)
    shadow.add_argument("--clear", action="store_true", help="stop mirroring")
    fault = action("fault", "inject errors or delays into a version's requests")
    fault.add_argument("version", type=int)
    fault.add_argument("--abort-percent", type=float, default=0.0, help="share answered an error")
    fault.add_argument("--abort-status", type=int, choices=[500, 503], default=500)
    fault.add_argument("--delay-ms", type=float, default=0.0, help="delay added before queueing")
    fault.add_argument("--delay-percent", type=float, default=100.0, help="share delayed")
    fault.add_argument("--clear", action="store_true", help="stop injecting faults")

    models = commands.add_parser("models", help="load or unload model versions at runtime")
    model_actions = models.add_subparsers(dest="models_command", required=True)
    for name, help_text in (
        ("load", "load a version from the repository"),
        ("unload", "drain and unload a version without traffic"),
    ):
        parser = model_actions.add_parser(name, help=help_text)
        parser.add_argument("model", type=model_name_argument)
        parser.add_argument("version", type=int)
        add_common_flags(parser)
        parser.set_defaults(func=lambda args: _run(_models, args))
