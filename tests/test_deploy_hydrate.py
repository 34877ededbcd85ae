"""The hydration worker's manifests in ``deploy/hydrate``: schemas, and agreement with the
worker's own defaults (port, secrets directory, queue name, settings)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aio_pika
import jsonschema
import kubernetes_validate
import pytest
import yaml
from aiohttp.test_utils import TestServer

from bridge.consumer import retry_queue_name
from bridge.hydrate import BINDING_PATTERNS, HydrateSettings, HydrationNames
from bridge.hydrate.service import openai_fetcher
from bridge.hydrate.topology import hydration_queue_arguments, objects_topology
from bridge.hydrate.worker import HydrationWorker
from bridge.samples import sample_body
from bridge.setting_names import valid_setting_names
from bridge.settings import DEFAULT_EXCHANGE, DEFAULT_SECRETS_DIR
from tests.openai_standin import OpenAIStandIn
from tests.test_alerts import CRD_SCHEMAS
from tests.test_deploy import (
    DEFINITIONS,
    EXCHANGE,
    KUBERNETES_VERSIONS,
    ImportedDefinitions,
    _rows,
    imported_definitions,
)

__all__ = ["imported_definitions"]  # a fixture used below

HYDRATE = Path(__file__).resolve().parents[1] / "deploy" / "hydrate"
NAME = "webhook-bridge-hydrate"
LABELS = {"app.kubernetes.io/name": NAME}
DEFAULTS = HydrateSettings.model_fields

_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}


def _closed(properties: dict[str, object], *required: str) -> dict[str, object]:
    """An object with these properties and no other, ``required`` among them."""
    return {
        "type": "object",
        "required": list(required),
        "properties": properties,
        "additionalProperties": False,
    }


def _keda_resource(kind: str, spec: dict[str, object]) -> dict[str, object]:
    metadata = _closed({"name": {"type": "string"}, "labels": _STRINGS}, "name")
    return _closed(
        {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": kind},
            "metadata": metadata,
            "spec": spec,
        },
        *("apiVersion", "kind", "metadata", "spec"),
    )


_NAME = _closed({"name": {"type": "string"}}, "name")
# KEDA's CRDs (keda.sh/v1alpha1), for the fields used here, closed so that a misspelt field
# fails here instead of being pruned by the API server.
KEDA_SCHEMAS = {
    "TriggerAuthentication": _keda_resource(
        "TriggerAuthentication",
        _closed(
            {
                "secretTargetRef": {
                    "type": "array",
                    "items": _closed(
                        {
                            "parameter": {"type": "string"},
                            "name": {"type": "string"},
                            "key": {"type": "string"},
                        },
                        *("parameter", "name", "key"),
                    ),
                }
            },
            "secretTargetRef",
        ),
    ),
    "ScaledObject": _keda_resource(
        "ScaledObject",
        _closed(
            {
                "scaleTargetRef": _NAME,
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": _closed(
                        {
                            "type": {"const": "rabbitmq"},
                            "metadata": _closed(
                                {
                                    "protocol": {"enum": ["amqp", "http", "auto"]},
                                    "queueName": {"type": "string"},
                                    "mode": {"enum": ["QueueLength", "MessageRate"]},
                                    "value": {"type": "string", "pattern": "^[0-9.]+$"},
                                },
                                *("protocol", "queueName", "mode", "value"),
                            ),
                            "authenticationRef": _NAME,
                        },
                        *("type", "metadata"),
                    ),
                },
            },
            *("scaleTargetRef", "triggers"),
        ),
    ),
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
    assert isinstance(only, dict)
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


# ------------------------------------------------------- broker definitions (deploy/rabbitmq)


def definitions() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DEFINITIONS.read_text())
    return loaded


def test_the_definitions_hold_the_topology_the_worker_declares() -> None:
    settings = HydrateSettings(openai_api_key="sk-test", hydrate_metrics_port=0)
    names = settings.names
    topology = objects_topology(settings)
    exchanges = {exchange["name"]: exchange for exchange in definitions()["exchanges"]}
    assert exchanges[names.objects]["type"] == "topic"
    assert exchanges[names.objects]["arguments"] == {
        "alternate-exchange": topology.unrouted_exchange
    }
    for name in (topology.unrouted_exchange, topology.quarantine_exchange):
        assert exchanges[name]["type"] == "fanout", name
    queues = {queue["name"]: queue for queue in definitions()["queues"]}
    assert queues[names.queue]["arguments"] == hydration_queue_arguments(settings)
    for name in (names.objects_unrouted, names.failed):
        assert queues[name]["arguments"] == {"x-queue-type": settings.queue_type}, name
    bound = {
        binding["routing_key"]
        for binding in definitions()["bindings"]
        if (binding["source"], binding["destination"]) == (names.exchange, names.queue)
    }
    assert bound == set(BINDING_PATTERNS)


@pytest.mark.broker
async def test_the_worker_runs_on_the_definitions_as_the_hydration_user(
    imported_definitions: ImportedDefinitions,
) -> None:
    """Nothing declared but retry queues: objects, failure records and a hand-back."""
    standin = OpenAIStandIn()
    server = TestServer(standin.app(), host="127.0.0.1")
    await server.start_server()
    standin.store_object(
        "/batches/batch_found", b'{"id": "batch_found", "object": "batch", "status": "completed"}'
    )
    standin.store_object(
        "/responses/resp_late", b'{"id":"resp_late","object":"response","status":"completed"}'
    )
    standin.failures["/v1/responses/resp_late"] = [503]
    settings = HydrateSettings(
        amqp_url=imported_definitions.hydrate_amqp_url,
        exchange=EXCHANGE,
        declare_topology=False,
        openai_api_key=standin.api_key,
        openai_base_url=str(server.make_url("/v1")),
        hydrate_attempts=1,
        hydrate_requeue_delay=0.2,
        hydrate_metrics_port=0,
    )
    worker = HydrationWorker(settings, openai_fetcher(settings))
    running = asyncio.create_task(worker.run())
    bridge = await aio_pika.connect(imported_definitions.amqp_url)
    try:
        deadline = time.monotonic() + 30
        while not worker.ready:
            assert not running.done(), running
            assert time.monotonic() < deadline, worker.not_ready_reason
            await asyncio.sleep(0.05)
        channel = await bridge.channel(publisher_confirms=True)
        ingress = await channel.get_exchange(f"{EXCHANGE}.ingress", ensure=False)
        for event_type, object_id in (
            ("batch.completed", "batch_found"),
            ("batch.failed", "batch_missing"),
            ("response.completed", "resp_late"),
        ):
            body = sample_body(event_type, overrides={"data.id": object_id})
            message = aio_pika.Message(
                body, message_id=f"wh_{object_id}", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            await ingress.publish(message, routing_key=event_type, mandatory=True)
        names = settings.names

        def counts() -> dict[str, str]:
            rows = _rows("list_queues", "-p", imported_definitions.vhost, "name", "messages")
            return {row[0]: row[1] for row in rows}

        while counts().get(names.objects_unrouted) != "2" or counts().get(names.failed) != "1":
            assert time.monotonic() < deadline + 30, counts()
            await asyncio.sleep(0.2)
        assert counts()[names.queue] == "0"
        assert retry_queue_name(names.queue, 200) in counts()
    finally:
        worker.stop()
        await asyncio.wait_for(running, 60)
        await bridge.close()
        await server.close()


def test_the_monitoring_component_scrapes_the_workers_operations_port() -> None:
    assert kustomization(HYDRATE / "monitoring")["kind"] == "Component"
    (monitor,) = load(HYDRATE / "monitoring" / "podmonitor.yaml")
    jsonschema.validate(monitor, CRD_SCHEMAS["PodMonitor"])
    assert monitor["spec"]["selector"]["matchLabels"] == LABELS
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {port["name"] for port in container()["ports"]}
