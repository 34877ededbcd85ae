"""Alert rules, dashboard and scrape config in ``deploy/monitoring``, checked by Prometheus's tools.

``promtool check rules`` parses the PrometheusRule's groups and every dashboard query
(each wrapped in a recording rule); ``promtool test rules`` runs
``tests/data/alerts-test.yaml``, where every alert fires on a broken deployment's series
and stays silent on a healthy one's. ``tests/test_prometheus.py`` runs the same queries
on a real Prometheus scraping a real bridge.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.monitoring import (
    ALERT_TESTS,
    MONITORING,
    alerts,
    dashboard,
    dashboard_panels,
    dashboard_queries,
    dashboard_recording_rules,
    needs_promtool,
    promtool,
    rule_groups,
    write_yaml,
)
from tests.test_deploy import kustomize_overlay

ROOT = Path(__file__).resolve().parents[1]

REQUIRED_ALERTS = {
    "WebhookBridgeAnswering503",
    "WebhookBridgeBrokerDisconnected",
    "WebhookBridgeQuarantineReceiving",
    "WebhookBridgeSignatureFailuresRising",
    "WebhookBridgePublishLatencyHigh",
    "WebhookBridgeDedupStoreErrors",
    "WebhookBridgeSecretReloadRefused",
    "WebhookBridgePodNotReady",
    "WebhookBridgeTargetDown",
    "WebhookBridgeBrokerFailoversFlapping",
}

# The parts of the Prometheus Operator's CRDs these manifests use (monitoring.coreos.com/v1),
# closed with additionalProperties: false so that a misspelt field fails here rather than
# being dropped silently by the API server's pruning.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
    "additionalProperties": False,
}
_DURATION = {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
             "(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}  # fmt: skip


def _custom_resource(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        "additionalProperties": False,
    }


PROMETHEUS_RULE_SCHEMA = _custom_resource(
    "PrometheusRule",
    {
        "type": "object",
        "required": ["groups"],
        "properties": {
            "groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "rules"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": _DURATION,
                        "rules": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["expr"],
                                "properties": {
                                    "alert": {"type": "string"},
                                    "record": {"type": "string"},
                                    "expr": {"type": "string"},
                                    "for": _DURATION,
                                    "keep_firing_for": _DURATION,
                                    "labels": _STRING_MAP,
                                    "annotations": _STRING_MAP,
                                },
                                "additionalProperties": False,
                            },
                        },
                    },
                    "additionalProperties": False,
                },
            }
        },
        "additionalProperties": False,
    },
)
POD_MONITOR_SCHEMA = _custom_resource(
    "PodMonitor",
    {
        "type": "object",
        "required": ["selector", "podMetricsEndpoints"],
        "properties": {
            "selector": {
                "type": "object",
                "properties": {"matchLabels": _STRING_MAP},
                "additionalProperties": False,
            },
            "podTargetLabels": {"type": "array", "items": {"type": "string"}},
            "jobLabel": {"type": "string"},
            "podMetricsEndpoints": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": _DURATION,
                        "scrapeTimeout": _DURATION,
                    },
                    "additionalProperties": False,
                },
            },
        },
        "additionalProperties": False,
    },
)
CRD_SCHEMAS = {"PrometheusRule": PROMETHEUS_RULE_SCHEMA, "PodMonitor": POD_MONITOR_SCHEMA}


def _load(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((MONITORING / name).read_text())
    return loaded


def _deployment() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "deployment.yaml").read_text())
    return loaded


# ------------------------------------------------------------------------ the rules


@needs_promtool
def test_rule_groups_pass_promtool_check(tmp_path: Path) -> None:
    rules = write_yaml(tmp_path / "rules.yaml", rule_groups())
    result = promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_every_alert_says_what_happened_and_what_to_do() -> None:
    names = [alert["alert"] for alert in alerts()]
    assert len(names) == len(set(names)), "alert names repeat"
    assert set(names) >= REQUIRED_ALERTS
    for alert in alerts():
        assert alert["alert"].startswith("WebhookBridge"), alert["alert"]
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, alert["alert"]
        annotations = alert["annotations"]
        assert set(annotations) >= {"summary", "description"}, alert["alert"]
        assert len(annotations["description"]) > 150, f"{alert['alert']}: say what to do"
        # Descriptions are static text (tests/data/alerts-test.yaml relies on it).
        assert "{{" not in annotations["description"], alert["alert"]


def test_the_docs_explain_every_alert() -> None:
    guide = (ROOT / "docs" / "how-to" / "kubernetes.md").read_text()
    missing = [alert["alert"] for alert in alerts() if f"`{alert['alert']}`" not in guide]
    assert missing == []


def _unit_tests_with_descriptions(rules_file: Path) -> dict[str, Any]:
    tests: dict[str, Any] = yaml.safe_load(ALERT_TESTS.read_text())
    descriptions = {alert["alert"]: alert["annotations"]["description"] for alert in alerts()}
    for group in tests["tests"]:
        for case in group["alert_rule_test"]:
            for expected in case["exp_alerts"]:
                expected["exp_annotations"]["description"] = descriptions[case["alertname"]]
    return {"rule_files": [str(rules_file)], **tests}


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    cases: dict[str, list[list[Any]]] = {}
    for group in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for case in group["alert_rule_test"]:
            cases.setdefault(case["alertname"], []).append(case["exp_alerts"])
    assert set(cases) == {alert["alert"] for alert in alerts()}
    for name, expectations in cases.items():
        assert [] in expectations, f"{name}: no case where it stays silent"
        assert any(expectations), f"{name}: no case where it fires"


@needs_promtool
def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    rules = write_yaml(tmp_path / "rules.yaml", rule_groups())
    tests = write_yaml(tmp_path / "alerts-test.yaml", _unit_tests_with_descriptions(rules))
    result = promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """A rule that never fires makes promtool fail: the passing run above means something."""
    groups = rule_groups()
    for rule in groups["groups"][0]["rules"]:
        if rule.get("alert") == "WebhookBridgeBrokerDisconnected":
            rule["expr"] = "vector(0) > 1"
    rules = write_yaml(tmp_path / "rules.yaml", groups)
    tests = write_yaml(tmp_path / "alerts-test.yaml", _unit_tests_with_descriptions(rules))
    result = promtool("test", "rules", str(tests))
    assert result.returncode != 0
    assert "WebhookBridgeBrokerDisconnected" in result.stdout + result.stderr


# --------------------------------------------------------------------- the dashboard


@needs_promtool
def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    recording = dashboard_recording_rules()
    rules = write_yaml(tmp_path / "dashboard-rules.yaml", recording)
    result = promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(recording['groups'][0]['rules'])} rules found" in result.stdout


@needs_promtool
def test_a_broken_dashboard_query_is_caught(tmp_path: Path) -> None:
    broken = {"groups": [{"name": "q", "rules": [{"record": "q", "expr": "sum by (le (x)"}]}]}
    result = promtool("check", "rules", str(write_yaml(tmp_path / "broken.yaml", broken)))
    assert result.returncode != 0


def test_dashboard_shows_what_operators_need() -> None:
    board = dashboard()
    assert board["uid"] == "openai-webhook-bridge"
    variables = {variable["name"] for variable in board["templating"]["list"]}
    assert {"datasource", "namespace", "job"} <= variables
    titles = {panel["title"] for panel in dashboard_panels()}
    assert {
        "Requests by outcome",
        "Publish latency (request to broker confirm)",
        "In flight",
        "Broker connection",
        "Reconnects and failovers",
        "Events published by type",
        "Secret matched",
        "Deduplication results",
        "Replay runs (last push per source)",
    } <= titles
    panel_ids = [panel["id"] for panel in board["panels"]]
    assert len(panel_ids) == len(set(panel_ids))
    for panel in dashboard_panels():
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel.get("description"), panel["title"]
    latency = [expr for title, expr in dashboard_queries() if title.startswith("Publish latency")]
    assert any("histogram_quantile(0.99, " in expr for expr in latency)
    assert all("webhook_bridge_publish_seconds_bucket" in expr for expr in latency)


# ----------------------------------------------------------- manifests and component


@pytest.mark.parametrize("name", ["prometheusrule.yaml", "podmonitor.yaml"])
def test_custom_resources_match_the_operator_schema(name: str) -> None:
    manifest = _load(name)
    jsonschema.validate(manifest, CRD_SCHEMAS[manifest["kind"]])
    assert manifest["metadata"]["labels"]["app.kubernetes.io/name"] == "webhook-bridge"


def test_crd_schemas_reject_misspelt_fields() -> None:
    manifest = _load("podmonitor.yaml")
    manifest["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, POD_MONITOR_SCHEMA)


def test_pod_monitor_scrapes_the_bridge_pods() -> None:
    spec = _load("podmonitor.yaml")["spec"]
    template = _deployment()["spec"]["template"]
    pod_labels = template["metadata"]["labels"]
    for key, value in spec["selector"]["matchLabels"].items():
        assert pod_labels.get(key) == value
    for label in spec["podTargetLabels"]:
        assert label in pod_labels
    (endpoint,) = spec["podMetricsEndpoints"]
    (container,) = template["spec"]["containers"]
    assert endpoint["port"] in {port["name"] for port in container["ports"]}
    assert endpoint["path"] == "/metrics"
    # The TargetDown alert selects on the label podTargetLabels copies.
    target_down = next(a for a in alerts() if a["alert"] == "WebhookBridgeTargetDown")
    assert 'app_kubernetes_io_name="webhook-bridge"' in target_down["expr"]


def test_monitoring_is_a_component_with_the_dashboard() -> None:
    component = _load("kustomization.yaml")
    assert component["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    assert component["kind"] == "Component"
    assert sorted(component["resources"]) == ["podmonitor.yaml", "prometheusrule.yaml"]
    (generator,) = component["configMapGenerator"]
    assert generator["files"] == ["dashboard.json"]
    assert generator["options"]["labels"]["grafana_dashboard"] == "1"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_an_overlay_with_the_component_renders_valid_manifests(tmp_path: Path) -> None:
    documents = kustomize_overlay(tmp_path, MONITORING)
    kinds = sorted(doc["kind"] for doc in documents)
    assert kinds.count("ConfigMap") == 2
    assert {"Deployment", "PodMonitor", "PrometheusRule"} <= set(kinds)
    for doc in documents:
        if doc["kind"] in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
        else:
            kubernetes_validate.validate(doc, desired_version="1.30", strict=True)
    board = next(doc for doc in documents if doc["metadata"]["name"] == "webhook-bridge-dashboard")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert yaml.safe_load(board["data"]["dashboard.json"]) == dashboard()
