"""The hydration worker's manifests in ``deploy/hydrate``: schemas, and agreement with the
worker's own defaults (port, secrets directory, queue name, settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from bridge.hydrate import HydrateSettings, HydrationNames
from bridge.setting_names import valid_setting_names
from bridge.settings import DEFAULT_EXCHANGE, DEFAULT_SECRETS_DIR
from tests.test_deploy import KUBERNETES_VERSIONS

HYDRATE = Path(__file__).resolve().parents[1] / "deploy" / "hydrate"
NAME = "webhook-bridge-hydrate"
LABELS = {"app.kubernetes.io/name": NAME}
DEFAULTS = HydrateSettings.model_fields

_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "labels": _STRINGS},
    "additionalProperties": False,
}
# KEDA's CRDs (keda.sh/v1alpha1), for the fields used here, closed so that a misspelt field
# fails here instead of being pruned by the API server.
KEDA_SCHEMAS = {
    "TriggerAuthentication": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": "TriggerAuthentication"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["secretTargetRef"],
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["parameter", "name", "key"],
                            "properties": {
                                "parameter": {"type": "string"},
                                "name": {"type": "string"},
                                "key": {"type": "string"},
                            },
                            "additionalProperties": False,
                        },
                    }
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
    "ScaledObject": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": "ScaledObject"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {"name": {"type": "string"}},
                        "additionalProperties": False,
                    },
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": {"const": "rabbitmq"},
                                "metadata": {
                                    "type": "object",
                                    "required": ["protocol", "queueName", "mode", "value"],
                                    "properties": {
                                        "protocol": {"enum": ["amqp", "http", "auto"]},
                                        "queueName": {"type": "string"},
                                        "mode": {"enum": ["QueueLength", "MessageRate"]},
                                        "value": {"type": "string", "pattern": "^[0-9.]+$"},
                                    },
                                    "additionalProperties": False,
                                },
                                "authenticationRef": {
                                    "type": "object",
                                    "required": ["name"],
                                    "properties": {"name": {"type": "string"}},
                                    "additionalProperties": False,
                                },
                            },
                            "additionalProperties": False,
                        },
                    },
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
}


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization(path: Path = HYDRATE) -> dict[str, Any]:
    (document,) = load(path / "kustomization.yaml")
    return document


def deployment() -> dict[str, Any]:
    (document,) = load(HYDRATE / "deployment.yaml")
    return document


def container() -> dict[str, Any]:
    (only,) = deployment()["spec"]["template"]["spec"]["containers"]
    return only


def test_the_base_applies_the_worker_but_never_the_secret_template() -> None:
    resources = kustomization()["resources"]
    assert resources == ["deployment.yaml", "networkpolicy.yaml"]
    kinds = sorted(doc["kind"] for name in resources for doc in load(HYDRATE / name))
    assert kinds == ["Deployment", "NetworkPolicy"]
    assert kustomization(HYDRATE / "keda")["kind"] == "Component"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", ["deployment.yaml", "networkpolicy.yaml", "secret.example.yaml"])
def test_kubernetes_schema(name: str, version: str) -> None:
    for doc in load(HYDRATE / name):
        kubernetes_validate.validate(doc, desired_version=version, strict=True)


def test_keda_resources_match_keda_schema_and_the_worker() -> None:
    documents = {doc["kind"]: doc for doc in load(HYDRATE / "keda" / "scaledobject.yaml")}
    for kind, document in documents.items():
        jsonschema.validate(document, KEDA_SCHEMAS[kind])
    scaled = documents["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == deployment()["metadata"]["name"]
    (trigger,) = scaled["triggers"]
    assert trigger["metadata"]["queueName"] == HydrationNames(DEFAULT_EXCHANGE).queue
    authentication = documents["TriggerAuthentication"]
    assert trigger["authenticationRef"]["name"] == authentication["metadata"]["name"]
    (host,) = authentication["spec"]["secretTargetRef"]
    assert (host["name"], host["key"]) == (NAME, "BRIDGE_AMQP_URL")


def test_the_worker_pods_are_not_the_bridges() -> None:
    """The bridge's Service and PodMonitor select app.kubernetes.io/name: webhook-bridge:
    the worker's pods must never receive webhooks."""
    spec = deployment()["spec"]
    assert spec["selector"]["matchLabels"] == LABELS
    assert spec["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == NAME
    for path in [HYDRATE / "deployment.yaml", HYDRATE / "networkpolicy.yaml"]:
        for doc in load(path):
            assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == NAME


def test_the_container_runs_hydrate_with_its_secret_and_operations_port() -> None:
    worker = container()
    assert worker["args"] == ["hydrate"]
    (port,) = worker["ports"]
    assert (port["name"], port["containerPort"]) == (
        "ops",
        DEFAULTS["hydrate_metrics_port"].default,
    )
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    mounts = {mount["name"]: mount for mount in worker["volumeMounts"]}
    assert mounts["secrets"]["mountPath"] == str(DEFAULT_SECRETS_DIR)
    volumes = {
        volume["name"]: volume for volume in deployment()["spec"]["template"]["spec"]["volumes"]
    }
    assert volumes["secrets"]["secret"]["secretName"] == NAME
    grace = deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > DEFAULTS["hydrate_api_timeout"].default


def test_the_secret_template_holds_only_settings_the_worker_reads() -> None:
    (secret,) = load(HYDRATE / "secret.example.yaml")
    assert secret["metadata"]["name"] == NAME
    keys = set(secret["stringData"])
    assert "OPENAI_API_KEY" in keys
    assert keys <= valid_setting_names()


def test_the_network_policy_lets_the_worker_reach_the_api_and_prometheus_in() -> None:
    (policy,) = load(HYDRATE / "networkpolicy.yaml")
    assert policy["spec"]["podSelector"]["matchLabels"] == LABELS
    egress_ports = {port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"]}
    assert {443, 5671, 5672, 53} <= egress_ports
    (ingress,) = policy["spec"]["ingress"]
    assert [port["port"] for port in ingress["ports"]] == ["ops"]
