"""``turnout monitor ...``: run the sidecar, build reference profiles, show its status.

turnout monitor [--listen unix:///path] [--metrics-port 9100] [--config FILE]
turnout monitor profile MODEL VERSION --data FILE [--input NAME] [--config FILE]
turnout monitor status [MODEL] [--json] [--url http://127.0.0.1:9100]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from monitor.settings import MonitorSettings, SettingsError, load_monitor_settings
from turnout_contract.address import ADDRESS_FILE, gateway_state_dir

__all__ = ["add_monitor_commands"]


def _settings(args: argparse.Namespace, **overrides: Any) -> MonitorSettings | None:
    try:
        return load_monitor_settings(getattr(args, "config", None), **overrides)
    except SettingsError as exc:
        print(f"turnout monitor: invalid configuration: {exc}", file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    from monitor.server import run_monitor

    settings = _settings(args, listen=args.listen, metrics_port=args.metrics_port, host=args.host)
    return 2 if settings is None else run_monitor(settings)


def _model_inputs(args: argparse.Namespace) -> dict[str, int | None] | None:
    """The model's input tensors -> features per row (None: not fixed), from the
    repository's ONNX file (``--model-repository``) or the running gateway; None when
    neither can tell."""
    if args.model_repository is not None:
        import onnx

        path = Path(args.model_repository) / args.model / str(args.version) / "model.onnx"
        graph = onnx.load(str(path), load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}
        found: dict[str, int | None] = {}
        for tensor in graph.input:
            if tensor.name in initializers:
                continue
            dims = [d.dim_value if d.HasField("dim_value") else -1
                    for d in tensor.type.tensor_type.shape.dim]  # fmt: skip
            found[tensor.name] = _width(dims)
        return found
    try:
        http = json.loads((gateway_state_dir() / ADDRESS_FILE).read_text())["http"]
        url = f"{http}/v2/models/{urllib.parse.quote(args.model)}/versions/{args.version}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            metadata = json.loads(reply.read())
    except (OSError, ValueError, KeyError):
        return None
    return {str(t["name"]): _width(list(t["shape"])) for t in metadata.get("inputs", [])}


def _width(shape: list[int]) -> int | None:
    """Features per row of a ``[batch, ...]`` tensor (None when a dimension is not fixed)."""
    inner = shape[1:]
    if any(d < 0 for d in inner):
        return None
    width = 1
    for d in inner:
        width *= d
    return width


def _expected_features(inputs: dict[str, int | None]) -> tuple[set[str], set[str]]:
    """Exact feature names, and tensor names whose positions are not fixed."""
    names: set[str] = set()
    open_ended: set[str] = set()
    for name, width in inputs.items():
        if width is None:
            open_ended.add(name)
        elif width == 1:
            names.add(name)
        else:
            names.update(f"{name}[{j}]" for j in range(width))
    return names, open_ended


def _profile(args: argparse.Namespace) -> int:
    from monitor.profiles import build_profile, load_data, save_profile

    settings = _settings(args, profiles_dir=args.profiles_dir)
    if settings is None:
        return 2
    try:
        inputs = _model_inputs(args)
    except (OSError, ValueError) as exc:
        print(f"turnout monitor profile: cannot read the model's inputs: {exc}", file=sys.stderr)
        return 1
    input_name = args.input
    if input_name is None and Path(args.data).suffix.lower() == ".npy":
        if inputs is None:
            print(
                "turnout monitor profile: cannot tell the model's input names (no running "
                "gateway found): pass --input NAME or --model-repository DIR",
                file=sys.stderr,
            )
            return 1
        if len(inputs) != 1:
            print(
                f"turnout monitor profile: {args.model} has inputs {', '.join(inputs)}: "
                "pass --input NAME for the tensor in the .npy file",
                file=sys.stderr,
            )
            return 1
        input_name = next(iter(inputs))
    try:
        columns = load_data(Path(args.data), input_name)
        profile = build_profile(
            args.model,
            args.version,
            columns,
            n_bins=settings.n_bins,
            categorical_max=settings.categorical_max,
            chunks=settings.reference_chunks,
            source=str(args.data),
        )
    except (OSError, ValueError) as exc:
        print(f"turnout monitor profile: {exc}", file=sys.stderr)
        return 1
    if inputs is not None:
        names, open_ended = _expected_features(inputs)
        matching = [
            f for f in profile.features
            if f in names or f.split("[")[0] in open_ended or f.startswith("output:")
        ]  # fmt: skip
        if not matching:
            shown = ", ".join(sorted(profile.features)[:5])
            wanted = ", ".join(sorted(names)[:5] or sorted(open_ended))
            print(
                f"turnout monitor profile: the profile's features ({shown}, ...) match none "
                f"of {args.model}/{args.version}'s inputs (e.g. {wanted}); nothing was "
                "stored: pass --input with the model's input name",
                file=sys.stderr,
            )
            return 1
    try:
        folder = save_profile(profile, settings.profiles_path())
    except (OSError, ValueError) as exc:
        print(f"turnout monitor profile: {exc}", file=sys.stderr)
        return 1
    kinds = [f.kind for f in profile.features.values()]
    print(
        f"stored the profile of {args.model}/{args.version} in {folder}: {profile.rows} rows, "
        f"{kinds.count('numerical')} numerical and {kinds.count('categorical')} categorical "
        "features"
    )
    return 0


def _fetch_status(url: str, model: str | None) -> dict[str, Any]:
    path = "/status" + (f"/{urllib.parse.quote(model, safe='')}" if model else "")
    with urllib.request.urlopen(url.rstrip("/") + path, timeout=10) as response:
        document: dict[str, Any] = json.loads(response.read())
    return document


def _running_sidecar() -> str:
    """The sidecar of the gateway running from this machine's state dir, else the default."""
    try:
        address = json.loads((gateway_state_dir() / ADDRESS_FILE).read_text()).get("monitor")
    except (OSError, ValueError):
        address = None
    return str(address) if address else "http://127.0.0.1:9100"


def _status(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get("TURNOUT_MONITOR_URL") or _running_sidecar()
    try:
        document = _fetch_status(url, args.model)
    except urllib.error.HTTPError as exc:
        print(f"turnout monitor status: {exc.code}: {exc.read().decode()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"turnout monitor status: no monitor at {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print_status(document)
    return 0


def _number(value: Any, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "ms":
        return f"{value * 1000:.2f}"
    return f"{value:.4g}"


def print_status(document: dict[str, Any]) -> None:
    """Tables: drift per feature against its threshold, then latency per arm."""
    from rich.console import Console
    from rich.table import Table

    drift = Table(title=f"drift (last {document['window_s']:g} s window; ks/wasserstein: recent)")
    for column in ("model", "version", "feature", "statistic", "value", "threshold", ""):
        drift.add_column(column)
    latency = Table(title="latency (ms, last window | since start)")
    for column in (
        "model",
        "version",
        "arm",
        "requests",
        "success",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "p99 all",
        "accuracy",
    ):
        latency.add_column(column)
    for model, versions in document["models"].items():
        for version, state in versions.items():
            for feature, found in state["features"].items():
                values = {**found["window"], **found["recent"]}
                for statistic in sorted(set(values) | set(found["thresholds"])):
                    value = values.get(statistic)
                    threshold = found["thresholds"].get(statistic)
                    flag = "DRIFT" if statistic in found["drifted"] else ""
                    drift.add_row(
                        model, version, feature, statistic, _number(value), _number(threshold), flag
                    )
            if state["reference"] is None:
                drift.add_row(model, version, "(no reference profile)", "", "", "", "")
            labelled = state.get("accuracy")
            accuracy = (
                f"{_number(labelled['ratio'])} of {labelled['labelled']}" if labelled else "-"
            )
            errors = state.get("regression")
            if errors:
                accuracy = (
                    f"mae {_number(errors['mae'])} rmse {_number(errors['rmse'])} "
                    f"of {errors['labelled']}"
                )
            for arm, found in state["latency"].items():
                window = found["window"] or {}
                cumulative = found["cumulative"] or {}
                latency.add_row(
                    model,
                    version,
                    arm,
                    str(found["requests"]),
                    _number(found["success_ratio"]),
                    *(_number(window.get(q), "ms") for q in ("p50", "p90", "p99", "p999")),
                    _number(cumulative.get("p99"), "ms"),
                    accuracy,
                )
    console = Console()
    if not console.is_terminal:  # piped: don't squeeze the tables into 80 columns
        console = Console(width=160)
    console.print(drift)
    console.print(latency)
    frames = document["frames"]
    console.print(
        f"frames: {frames['received']} received, {frames['dropped']} dropped, "
        f"{frames['invalid']} invalid; alerts: "
        + (
            ", ".join(
                f"{a['alert']} {a['status']} ({a['model']}/{a['version']} {a['feature']})"
                for a in document.get("alerts", [])
            )
            or "none"
        )
    )


def add_monitor_commands(commands: Any) -> None:
    monitor = commands.add_parser(
        "monitor", help="the monitor sidecar: drift and latency of live traffic"
    )
    monitor.add_argument("--listen", help="records socket, unix:///path (default STATE_DIR)")
    monitor.add_argument("--metrics-port", type=int, help="/metrics and /status port (9100)")
    monitor.add_argument("--host", help="address the metrics server binds (127.0.0.1)")
    monitor.add_argument("--config", type=Path, help="YAML settings file")
    monitor.set_defaults(func=_run)
    actions = monitor.add_subparsers(dest="monitor_command")

    profile = actions.add_parser("profile", help="build and store a version's reference profile")
    profile.add_argument("model")
    profile.add_argument("version", type=int)
    profile.add_argument("--data", required=True, help="reference data: .csv, .parquet or .npy")
    profile.add_argument(
        "--input", help="tensor name: .npy data, or every CSV/Parquet column as its positions"
    )
    profile.add_argument("--profiles-dir", type=Path, help="default STATE_DIR/profiles")
    profile.add_argument(
        "--model-repository",
        type=Path,
        help="read the model's input names here (default: from the running gateway)",
    )
    profile.add_argument("--config", type=Path, help="YAML settings file (bins, chunks)")
    profile.set_defaults(func=_profile)

    status = actions.add_parser("status", help="drift, thresholds and latency per version")
    status.add_argument("model", nargs="?")
    status.add_argument("--json", action="store_true", help="print the JSON document")
    status.add_argument(
        "--url", help="the sidecar (default: the local gateway's, else http://127.0.0.1:9100)"
    )
    status.set_defaults(func=_status)
