"""deploy/: the Prometheus rules, their unit tests and example config, and the Grafana
dashboard, checked with promtool and against docs/metrics.md."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from gateways import PROMTOOL

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "turnout-rules.yaml"
RULES_TESTS = PROMETHEUS_DIR / "turnout-rules.test.yaml"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "turnout.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"

needs_promtool = pytest.mark.skipif(
    not os.access(PROMTOOL, os.X_OK),
    reason="promtool is not installed (apt-get install prometheus)",
)

METRIC = re.compile(r"\bturnout_[a-z0-9_]+")
# `turnout_drift_{psi,js}` and the like, as the docs may write families.
METRIC_FAMILY = re.compile(r"\b(turnout_[a-z0-9_]*)\{([a-z0-9_, ]+)\}([a-z0-9_]*)")
SUFFIXES = ("_bucket", "_sum", "_count", "_total")
GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)")
DURATION_VARIABLES = {"__rate_interval", "__interval", "__range"}


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def load_yaml(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as file:
        document = yaml.safe_load(file)
    assert isinstance(document, dict), path
    return document


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule for group in load_yaml(RULES)["groups"] for rule in group["rules"] if "alert" in rule
    ]


def dashboard() -> dict[str, Any]:
    document = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Panels, with those nested in collapsed rows."""
    found = []
    for panel in panels:
        found.append(panel)
        found.extend(all_panels(panel.get("panels", [])))
    return found


def dashboard_exprs() -> list[str]:
    return [
        target["expr"]
        for panel in all_panels(dashboard()["panels"])
        for target in panel.get("targets", [])
    ]


def substitute_variables(expr: str) -> str:
    """The expression as Grafana sends it: durations for $__rate_interval and co, a
    match-all regex for the template variables."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return "5m" if name in DURATION_VARIABLES else ".*"

    return GRAFANA_VARIABLE.sub(value, expr)


def normalise(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def metric_names(text: str) -> set[str]:
    names = {normalise(name) for name in METRIC.findall(text)}
    for prefix, alternatives, suffix in METRIC_FAMILY.findall(text):
        names.update(normalise(f"{prefix}{alt.strip()}{suffix}") for alt in alternatives.split(","))
    return names


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    """`promtool check rules` accepts the alerting rules."""
    result = promtool("check", "rules", RULES.name, cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_rule_unit_tests_pass() -> None:
    """`promtool test rules` passes every case of the rules' unit tests."""
    result = promtool("test", "rules", RULES_TESTS.name, cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_checks_the_example_config(tmp_path: Path) -> None:
    """The example config is valid, with the rule file it loads next to it."""
    shutil.copy(CONFIG, tmp_path / CONFIG.name)
    shutil.copy(RULES, tmp_path / RULES.name)
    result = promtool("check", "config", CONFIG.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    config = load_yaml(CONFIG)
    assert config["rule_files"] == [RULES.name]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"turnout-gateway", "turnout-monitor"}
    assert jobs["turnout-gateway"]["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
    assert jobs["turnout-monitor"]["static_configs"][0]["targets"] == ["127.0.0.1:9100"]


def test_every_alert_is_labelled_and_annotated() -> None:
    """Each alert has a severity and a summary and description."""
    rules = alert_rules()
    assert rules
    assert len({rule["alert"] for rule in rules}) == len(rules)
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    """The unit tests make each alert fire at least once and stay quiet at least once."""
    tests = load_yaml(RULES_TESTS)
    assert tests["rule_files"] == [RULES.name]
    cases = [case for test in tests["tests"] for case in test.get("alert_rule_test", [])]
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    for case in cases:
        for alert in case.get("exp_alerts") or []:
            assert alert.get("exp_labels") and alert.get("exp_annotations"), case["alertname"]
    alerts = {rule["alert"] for rule in alert_rules()}
    assert not alerts - firing, f"alerts never fired by the tests: {sorted(alerts - firing)}"
    assert not alerts - quiet, f"alerts never checked quiet: {sorted(alerts - quiet)}"
    assert not (firing | quiet) - alerts, "tests of alerts the rules do not define"


def test_dashboard_structure() -> None:
    """The dashboard has its uid, variables, unique panel ids and complete targets."""
    board = dashboard()
    assert board["uid"] == "turnout"
    assert board["schemaVersion"] == 39
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "version"):
        assert variables[name]["type"] == "query"
        assert variables[name]["multi"] and variables[name]["includeAll"]
    panels = all_panels(board["panels"])
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    for panel in panels:
        assert panel["title"] and "gridPos" in panel, panel["id"]
        if panel["type"] == "row":
            continue
        assert panel["description"] and panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"] and "legendFormat" in target, panel["title"]


@needs_promtool
def test_dashboard_exprs_are_valid_promql(tmp_path: Path) -> None:
    """Every target's expression parses, with Grafana's variables substituted."""
    exprs = dashboard_exprs()
    assert exprs
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": substitute_variables(expr)}
        for i, expr in enumerate(exprs)
    ]
    for rule in rules:
        assert "$" not in rule["expr"], rule["expr"]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", path.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_metrics_used_are_documented() -> None:
    """Every turnout_* metric the rules and the dashboard use is in docs/metrics.md."""
    used = metric_names(RULES.read_text(encoding="utf-8")) | metric_names(
        DASHBOARD.read_text(encoding="utf-8")
    )
    assert used
    if not METRICS_DOC.is_file():
        pytest.fail(f"{METRICS_DOC.relative_to(ROOT)} is missing: cannot check {sorted(used)}")
    documented = metric_names(METRICS_DOC.read_text(encoding="utf-8"))
    missing = sorted(used - documented)
    assert not missing, f"metrics used in deploy/ but not in docs/metrics.md: {missing}"
