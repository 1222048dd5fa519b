"""deploy/compose.yaml: podman-compose renders it, and every file it mounts, every port it
publishes and every image it runs exists or is built here; the configs it mounts are
valid (promtool, the collector's pipeline, Grafana's provisioning).

Third-party images cannot be pulled here: they are checked to be pinned, fully qualified
references."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from gateways import PROMTOOL

from gateway.settings import ServerSettings
from monitor.settings import MonitorSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
PODMAN_COMPOSE = Path(sys.executable).with_name("podman-compose")
VERSION = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)
# Image references: registry/path:tag, a tag that is a version (no `latest`).
PINNED = re.compile(r"[a-z0-9.-]+\.[a-z]+/[a-z0-9/_.-]+:v?\d+\.\d+\.\d+")
SERVICES = {"gateway", "prometheus", "grafana", "otel-collector", "jaeger"}


@cache
def rendered() -> dict[str, Any]:
    """The compose file as podman-compose resolves it (paths made absolute, defaults
    filled in); --dry-run needs no podman."""
    assert PODMAN_COMPOSE.is_file(), f"{PODMAN_COMPOSE} is missing: pip install -e '.[dev]'"
    result = subprocess.run(
        [str(PODMAN_COMPOSE), "--dry-run", "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    document = yaml.safe_load(result.stdout)
    assert isinstance(document, dict)
    return document


def service(name: str) -> dict[str, Any]:
    found: dict[str, Any] = rendered()["services"][name]
    return found


def bind_mounts() -> list[tuple[str, Path, str]]:
    mounts = []
    for name, spec in rendered()["services"].items():
        for volume in spec.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith(("/", ".")):
                mounts.append((name, (DEPLOY / source).resolve(), target))
    return mounts


def mounted(target: str) -> Path:
    found = [source for _, source, mount in bind_mounts() if mount == target]
    assert len(found) == 1, target
    return found[0]


def test_services() -> None:
    assert set(rendered()["services"]) == SERVICES
    assert rendered()["name"] == "turnout"


def test_every_bind_mount_exists() -> None:
    """Each file or folder mounted into a container is in the repository."""
    mounts = bind_mounts()
    assert len(mounts) >= 6
    for name, source, _ in mounts:
        assert source.exists(), f"{name} mounts {source}, which does not exist"
        assert ROOT in source.parents, source


def test_images_exist_or_are_built_here() -> None:
    """The gateway's image is built from deploy/Containerfile at the project's version;
    every other image is a pinned, fully qualified reference."""
    gateway = service("gateway")
    build = gateway["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).is_file()
    assert VERSION and gateway["image"] == f"localhost/turnout:{VERSION.group(1)}"
    for name in SERVICES - {"gateway"}:
        assert PINNED.fullmatch(service(name)["image"]), service(name)["image"]


def test_ports_are_the_servers() -> None:
    """Published ports are those the gateway, sidecar and tools listen on inside."""
    published = {
        name: {int(port.split(":")[-1]) for port in spec.get("ports", [])}
        for name, spec in rendered()["services"].items()
    }
    defaults = ServerSettings.model_fields
    gateway = {defaults["http_port"].default, defaults["grpc_port"].default}
    gateway.add(MonitorSettings.model_fields["metrics_port"].default)
    assert published["gateway"] == gateway == {8000, 8001, 9100}
    assert published["prometheus"] == {9090}
    assert published["grafana"] == {3000}
    assert published["jaeger"] == {16686}


def test_gateway_settings_are_turnouts() -> None:
    """Its flags are `turnout serve`'s and its variables real settings; traces go to the
    collector's OTLP/HTTP port."""
    gateway = service("gateway")
    command = gateway["command"]
    assert command[:2] == ["--model-repository", "/opt/turnout/demo-models"]
    environment = gateway["environment"]
    fields = {f"TURNOUT_{name.upper()}" for name in ServerSettings.model_fields}
    fields |= {f"TURNOUT_MONITOR_{name.upper()}" for name in MonitorSettings.model_fields}
    for variable in environment:
        assert not variable.startswith("TURNOUT_") or variable in fields, variable
    assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    collector = yaml.safe_load(mounted("/etc/otelcol/config.yaml").read_text())
    http = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert http.endswith(":4318")
    assert gateway["shm_size"]  # Ray's object store


@pytest.mark.skipif(not os.access(PROMTOOL, os.X_OK), reason="promtool is not installed")
def test_prometheus_config_scrapes_the_gateway(tmp_path: Path) -> None:
    """promtool accepts the stack's Prometheus config with the rules mounted beside it; the
    jobs are those the rules select, aimed at the gateway container's ports."""
    config_path = mounted("/etc/prometheus/prometheus.yml")
    rules_path = mounted("/etc/prometheus/turnout-rules.yaml")
    shutil.copy(config_path, tmp_path / "prometheus.yml")
    shutil.copy(rules_path, tmp_path / "turnout-rules.yaml")
    result = subprocess.run(
        [PROMTOOL, "check", "config", "prometheus.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(config_path.read_text())
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]
    }
    assert targets == {"turnout-gateway": ["gateway:8000"], "turnout-monitor": ["gateway:9100"]}
    assert config["rule_files"] == ["turnout-rules.yaml"]


def test_collector_pipeline_reaches_jaeger() -> None:
    """Every component a pipeline names is defined; traces are exported to Jaeger's OTLP."""
    collector = yaml.safe_load(mounted("/etc/otelcol/config.yaml").read_text())
    pipeline = collector["service"]["pipelines"]["traces"]
    for kind in ("receivers", "processors", "exporters"):
        assert set(pipeline[kind]) <= set(collector[kind]), kind
    (exporter,) = (collector["exporters"][name] for name in pipeline["exporters"])
    assert exporter["endpoint"] == "jaeger:4317"


def test_grafana_provisions_the_dashboard() -> None:
    """The data source is the stack's Prometheus and the dashboard folder holds
    deploy/grafana/turnout.json."""
    datasources = mounted("/etc/grafana/provisioning/datasources")
    (source,) = yaml.safe_load((datasources / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = mounted("/etc/grafana/provisioning/dashboards")
    (provider,) = yaml.safe_load((providers / "turnout.yaml").read_text())["providers"]
    dashboard = mounted(f"{provider['options']['path']}/turnout.json")
    assert dashboard == DEPLOY / "grafana" / "turnout.json"
