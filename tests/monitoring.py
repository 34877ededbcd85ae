"""The monitoring artefacts in ``deploy/monitoring`` as Prometheus's own tools see them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

MONITORING = Path(__file__).resolve().parents[1] / "deploy" / "monitoring"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "dashboard.json"
ALERT_TESTS = Path(__file__).parent / "data" / "alerts-test.yaml"

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed"
)

_BRIDGE_METRIC = re.compile(r"\bwebhook_bridge_[a-z0-9_]+\b")
# Grafana's variables, as the dashboard's queries use them: every namespace and job.
_GRAFANA_VARIABLES = {"$namespace": ".*", "$job": ".*", "$source": ".*"}


def rule_groups() -> dict[str, Any]:
    """The PrometheusRule's ``spec`` as a plain Prometheus rule file (``groups:``)."""
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    return {"groups": rule["spec"]["groups"]}


def alerts() -> list[dict[str, Any]]:
    return [rule for group in rule_groups()["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def dashboard_queries(rate_interval: str = "5m") -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` for every target, with Grafana's variables filled in."""
    queries = []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", rate_interval)
            for variable, value in _GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unknown Grafana variable in {expr}"
            queries.append((panel["title"], expr))
    return queries


def dashboard_recording_rules() -> dict[str, Any]:
    """Each dashboard query wrapped in a recording rule, so that promtool parses them all."""
    rules = [
        {"record": f"dashboard:query_{index}", "expr": expr}
        for index, (_title, expr) in enumerate(dashboard_queries())
    ]
    return {"groups": [{"name": "dashboard-queries", "rules": rules}]}


def bridge_metric_names(expr: str) -> set[str]:
    return set(_BRIDGE_METRIC.findall(expr))


def queried_metric_names() -> set[str]:
    """Every ``webhook_bridge_*`` series name the alert rules and the dashboard read."""
    exprs = [rule["expr"] for group in rule_groups()["groups"] for rule in group["rules"]]
    exprs += [expr for _title, expr in dashboard_queries()]
    return set().union(*(bridge_metric_names(expr) for expr in exprs))


def exposed_series_names(exposition: str) -> set[str]:
    """The series names an exposition offers, including families with no child yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
        else:
            names.add(family.name)
    return names


def promtool(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def write_yaml(path: Path, content: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path
