"""The gateway's commands of ``turnout``: ``serve``, ``demo`` and the admin commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.settings import SettingsError, load_settings

__all__ = ["add_gateway_commands"]


def _serve(args: argparse.Namespace) -> int:
    from gateway.server import run_gateway

    try:
        settings = load_settings(
            args.config,
            model_repository=args.model_repository,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            backend=args.backend,
            ray_address=args.ray_address,
            monitor=False if args.no_monitor else None,
            monitor_address=args.monitor_address,
            tls_cert_file=args.tls_cert,
            tls_key_file=args.tls_key,
            tls_client_ca_file=args.tls_client_ca,
        )
    except SettingsError as exc:
        print(f"turnout: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if not settings.model_repository.is_dir():
        print(
            f"turnout: model repository {settings.model_repository} is not a directory",
            file=sys.stderr,
        )
        return 2
    return run_gateway(settings)


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(
        Path(args.models),
        backend=args.backend,
        requests=args.requests,
        keep_serving=not args.no_wait,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
    )


def add_gateway_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser("serve", help="serve a model repository over HTTP and gRPC")
    serve.add_argument("--model-repository", type=Path, help="DIR/<model>/<version>/model.onnx")
    serve.add_argument("--config", type=Path, help="YAML settings file")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int, help="HTTP port (default 8000)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 8001)")
    serve.add_argument("--backend", choices=["ray", "local"], help="replica backend (default ray)")
    serve.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS or local)")
    serve.add_argument(
        "--no-monitor", action="store_true", help="send no request records, start no sidecar"
    )
    serve.add_argument(
        "--monitor-address",
        help="send request records to a sidecar already running there (unix:///path)",
    )
    serve.add_argument("--tls-cert", type=Path, help="serve HTTPS and gRPC over TLS (PEM chain)")
    serve.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    serve.add_argument("--tls-client-ca", type=Path, help="require client certificates (mTLS)")
    serve.set_defaults(func=_serve)

    demo = commands.add_parser("demo", help="build demo models, serve them and show traffic")
    demo.add_argument("--models", default="demo-models", help="where to write the demo models")
    demo.add_argument("--backend", choices=["ray", "local"], default="ray")
    demo.add_argument("--requests", type=int, default=2000, help="size of the traffic burst")
    demo.add_argument("--http-port", type=int, default=8000)
    demo.add_argument("--grpc-port", type=int, default=8001)
    demo.add_argument("--no-wait", action="store_true", help="stop after the summary")
    demo.set_defaults(func=_demo)

    from gateway.admin.cli import add_admin_commands
    from gateway.admin.rollout_cli import add_experiment_commands, add_rollout_commands

    add_admin_commands(commands)
    add_rollout_commands(commands)
    add_experiment_commands(commands)
