"""Deployment artefacts: YAML lint, Kubernetes and compose schemas, Dockerfile, broker definitions.

Everything here reads files from the repository, except the ``broker`` tests, which import
``deploy/rabbitmq/definitions.json`` into a fresh vhost of the local RabbitMQ (with renamed
users) and remove it again afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import aiohttp
import aiormq.exceptions
import jsonschema
import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from bridge.samples import sample_body
from tests.conftest import AMQP_URL, BridgeProcess, Signer

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DEFINITIONS = DEPLOY / "rabbitmq" / "definitions.json"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"

APP_LABEL = {"app.kubernetes.io/name": "webhook-bridge"}
REDIS_LABELS = {"app.kubernetes.io/name": "redis"}
REDIS_PORTS = {6379, 26379}  # Redis, Sentinel
SECRETS_DIR = "/run/secrets/webhook-bridge"
EXCHANGE = "openai.webhooks"
UNROUTED = "openai.webhooks.unrouted"
QUARANTINE = "openai.webhooks.quarantine"
DEAD_LETTER = "openai.webhooks.dead-letter"
EXAMPLE_QUEUE = "billing.batch-outcomes"
INGRESS = "openai.webhooks.ingress"
ARCHIVE = "openai.webhooks.archive"
BRIDGE_USER = "webhook-bridge"
CONSUMER_USER = "webhook-consumer"
HYDRATE_USER = "webhook-hydrate"

# Oldest Kubernetes minor we claim to support, plus the newest the installed schemas know.
OLDEST_KUBERNETES = "1.30"
KUBERNETES_VERSIONS = sorted(
    {OLDEST_KUBERNETES, ".".join(str(kubernetes_validate.latest_version()).split(".")[:2])},
    key=lambda version: tuple(int(part) for part in version.split(".")),
)

# Directories that hold no YAML of ours (virtualenvs, caches, build output).
NOT_OURS = {
    ".git",
    ".venv",
    "venv",
    "node_modules",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "build",
    "dist",
    "__pycache__",
}


# --------------------------------------------------------------------------- helpers


def _repo_yaml_files() -> list[Path]:
    found = []
    for pattern in ("*.yaml", "*.yml"):
        for path in ROOT.rglob(pattern):
            relative = path.relative_to(ROOT)
            if NOT_OURS.intersection(relative.parts[:-1]):
                continue
            if relative.parts[:2] == ("bench", "results"):
                continue
            found.append(path)
    return sorted(found)


def _load_all(path: Path) -> list[dict[str, Any]]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: every document must be a mapping"
    return docs


def kustomize_overlay(tmp_path: Path, component: Path) -> list[dict[str, Any]]:
    """The documents ``kubectl kustomize`` renders for an overlay of deploy/ with
    ``component``."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize takes only relative paths.
                "resources": [os.path.relpath(DEPLOY, overlay)],
                "components": [os.path.relpath(component, overlay)],
            }
        )
    )
    rendered = subprocess.run(
        ["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(overlay)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def _kustomization() -> dict[str, Any]:
    (kustomization,) = _load_all(DEPLOY / "kustomization.yaml")
    return kustomization


def _resource_files() -> list[Path]:
    return [DEPLOY / name for name in _kustomization()["resources"]]


def _manifests() -> list[dict[str, Any]]:
    return [doc for path in _resource_files() for doc in _load_all(path)]


def _only(kind: str) -> dict[str, Any]:
    matches = [doc for doc in _manifests() if doc.get("kind") == kind]
    assert len(matches) == 1, f"expected one {kind} in the kustomization, got {len(matches)}"
    return matches[0]


def _pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = _only("Deployment")["spec"]["template"]["spec"]
    return spec


def _container() -> dict[str, Any]:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1, "the bridge pod runs one container"
    container: dict[str, Any] = containers[0]
    return container


def _config() -> dict[str, str]:
    data: dict[str, str] = _only("ConfigMap")["data"]
    return data


def _container_port(port: int | str) -> int:
    """Resolve a probe/service port (number or port name) to the container's port number."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in _container().get("ports", [])}
    assert port in named, f"port name {port!r} is not declared by the container"
    return int(named[port])


def _selects_pods(selector: dict[str, Any]) -> bool:
    labels = _only("Deployment")["spec"]["template"]["metadata"]["labels"]
    wanted = selector.get("matchLabels", selector)
    return bool(wanted) and all(labels.get(key) == value for key, value in wanted.items())


def _compose() -> dict[str, Any]:
    (compose,) = _load_all(COMPOSE)
    return compose


def _service(name: str) -> dict[str, Any]:
    services: dict[str, Any] = _compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    service: dict[str, Any] = services[name]
    return service


def _unescape_compose(text: str) -> str:
    """What the container sees: compose turns ``$$`` into ``$``; a lone ``$`` would interpolate."""
    lone = [match.start() for match in re.finditer(r"\$\$|\$", text) if match.group() == "$"]
    assert not lone, f"unescaped '$' (compose would interpolate it) at offsets {lone}"
    return text.replace("$$", "$")


def _env_files(service: dict[str, Any]) -> list[str]:
    env_file = service.get("env_file", [])
    entries = [env_file] if isinstance(env_file, str) else env_file
    return [entry if isinstance(entry, str) else entry["path"] for entry in entries]


def _stub(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


# ------------------------------------------------------------------------------ YAML


def test_yaml_files_found() -> None:
    found = {path.relative_to(ROOT).as_posix() for path in _repo_yaml_files()}
    expected = {
        ".yamllint.yaml",
        "docker-compose.yml",
        "deploy/kustomization.yaml",
        "deploy/deployment.yaml",
        "deploy/secret.example.yaml",
    }
    assert expected <= found


@pytest.mark.parametrize(
    "path", _repo_yaml_files(), ids=lambda path: path.relative_to(ROOT).as_posix()
)
def test_yamllint(path: Path) -> None:
    config = YamlLintConfig(file=str(ROOT / ".yamllint.yaml"))
    problems = [
        f"{path.relative_to(ROOT)}:{problem.line}:{problem.column}: "
        f"[{problem.level}] {problem.desc} ({problem.rule})"
        for problem in linter.run(path.read_text(), config, str(path))
    ]
    assert problems == []


# ------------------------------------------------------------------------ Kubernetes


def test_kustomization_resources_exist() -> None:
    kustomization = _kustomization()
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    for name in resources:
        assert (DEPLOY / name).is_file(), f"kustomization lists missing file {name}"
    assert "secret.example.yaml" not in resources, "the Secret template must never be applied"
    kinds = sorted(doc["kind"] for doc in _manifests())
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Service",
        ]
    )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "name",
    [*(path.name for path in _resource_files()), "secret.example.yaml"],
)
def test_kubernetes_schema(name: str, version: str) -> None:
    for doc in _load_all(DEPLOY / name):
        kubernetes_validate.validate(doc, desired_version=version, strict=True)


def test_every_manifest_carries_the_app_label() -> None:
    for doc in [*_manifests(), *_load_all(DEPLOY / "secret.example.yaml")]:
        labels = doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "webhook-bridge", doc["kind"]


def test_shutdown_fits_in_the_grace_period() -> None:
    pod = _pod_spec()
    grace = pod["terminationGracePeriodSeconds"]
    command = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    assert len(command) == 2, command
    pre_stop = float(command[1])
    drain = float(_config()["BRIDGE_DRAIN_TIMEOUT"])
    assert pre_stop >= 1, "preStop must give endpoint removal time to propagate"
    assert drain < 30, "BRIDGE_DRAIN_TIMEOUT must stay below Kubernetes' 30 s default grace"
    assert pre_stop + drain < grace, (
        f"preStop {pre_stop}s + drain {drain}s exceeds terminationGracePeriodSeconds {grace}"
    )


def test_pod_security() -> None:
    pod = _pod_spec()
    pod_context = pod["securityContext"]
    assert pod_context["runAsNonRoot"] is True
    assert pod_context["runAsUser"] == 10001
    assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}
    context = _container()["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context.get("runAsUser", pod_context["runAsUser"]) == 10001
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert not context["capabilities"].get("add")
    assert context.get("privileged", False) is False
    assert context.get("seccompProfile", pod_context["seccompProfile"]) == {
        "type": "RuntimeDefault"
    }
    assert pod.get("automountServiceAccountToken") is False
    # A read-only root filesystem still needs a writable /tmp.
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    tmp = [m for m in _container()["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert len(tmp) == 1
    assert "emptyDir" in volumes[tmp[0]["name"]]


def test_probes() -> None:
    container = _container()
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz"
    operations = _operations_port()
    assert _container_port(readiness["port"]) == operations
    assert _container_port(liveness["port"]) == operations


def _webhook_port() -> int:
    return int(_config()["BRIDGE_PORT"])


def _operations_port() -> int:
    port = int(_config()["BRIDGE_METRICS_PORT"])
    assert port not in (0, _webhook_port()), "operations on a port of their own"
    return port


def test_container_declares_both_ports() -> None:
    declared = {port["containerPort"] for port in _container()["ports"]}
    assert declared == {_webhook_port(), _operations_port()}


def test_secret_mounted_as_files_and_config_from_configmap() -> None:
    container = _container()
    volumes = {volume["name"]: volume for volume in _pod_spec()["volumes"]}
    secret_mounts = [m for m in container["volumeMounts"] if m["mountPath"] == SECRETS_DIR]
    assert len(secret_mounts) == 1
    assert secret_mounts[0]["readOnly"] is True
    secret = volumes[secret_mounts[0]["name"]]["secret"]
    assert secret["secretName"] == "webhook-bridge"
    assert secret.get("defaultMode", 0o644) & 0o007 == 0, "secret files must not be world-readable"
    assert _config()["BRIDGE_SECRETS_DIR"] == SECRETS_DIR
    config_map = _only("ConfigMap")["metadata"]["name"]
    assert {"configMapRef": {"name": config_map}} in container["envFrom"]
    # Secrets never travel as plain env values in the manifest or the ConfigMap.
    plain = {env["name"] for env in container.get("env", [])} | set(_config())
    assert not plain & {"BRIDGE_WEBHOOK_SECRET", "BRIDGE_AMQP_URL"}
    # The least-privilege broker user cannot declare: topology is managed by definitions.
    assert _config()["BRIDGE_DECLARE_TOPOLOGY"] == "false"


def test_resources_requests_and_limits() -> None:
    resources = _container()["resources"]
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[section]), section


def test_replicas_spread_and_scrape_annotations() -> None:
    deployment = _only("Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "openai-webhook-bridge:0.1.0"
    )
    spread = _pod_spec()["topologySpreadConstraints"]
    keys = {constraint["topologyKey"] for constraint in spread}
    assert {"topology.kubernetes.io/zone", "kubernetes.io/hostname"} <= keys
    for constraint in spread:
        assert _selects_pods(constraint["labelSelector"])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == _operations_port()
    assert annotations["prometheus.io/path"] == "/metrics"


def test_service() -> None:
    service = _only("Service")["spec"]
    assert service.get("type", "ClusterIP") == "ClusterIP"
    assert _selects_pods(service["selector"])
    (port,) = service["ports"]  # the webhook port only: probes and scrapes reach pods directly
    assert port["port"] == 80
    assert _container_port(port["targetPort"]) == _webhook_port() == 8080


def test_pod_disruption_budget() -> None:
    pdb = _only("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]
    assert _selects_pods(pdb["spec"]["selector"])


def test_horizontal_pod_autoscaler() -> None:
    hpa = _only("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": _only("Deployment")["metadata"]["name"],
    }
    assert spec["minReplicas"] >= 3
    assert spec["maxReplicas"] > spec["minReplicas"]
    cpu = [m for m in spec["metrics"] if m["type"] == "Resource"]
    assert cpu
    assert cpu[0]["resource"]["name"] == "cpu"
    assert cpu[0]["resource"]["target"]["type"] == "Utilization"
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0
    comments = [
        line
        for line in (DEPLOY / "hpa.yaml").read_text().splitlines()
        if line.strip().startswith("#")
    ]
    assert any("webhook_bridge_in_flight" in line for line in comments)
    assert any("type: Pods" in line for line in comments)


def test_network_policy() -> None:
    spec = _only("NetworkPolicy")["spec"]
    assert _selects_pods(spec["podSelector"])
    assert "Ingress" in spec["policyTypes"]
    assert spec["ingress"], "an empty ingress list would deny the webhooks themselves"
    admitted: dict[int, list[list[dict[str, Any]]]] = {}
    for rule in spec["ingress"]:
        # A rule without ports would open every port.
        assert rule.get("ports"), rule
        for port in rule["ports"]:
            assert port.get("protocol", "TCP") == "TCP"
            admitted.setdefault(_container_port(port["port"]), []).append(rule.get("from", []))
    assert set(admitted) == {_webhook_port(), _operations_port()}
    assert admitted[_webhook_port()] == [[]], "anyone may send webhooks"
    [sources] = admitted[_operations_port()]
    assert sources == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ], "only the monitoring namespace reaches /metrics (and the node's kubelet the probes)"
    if "Egress" in spec["policyTypes"]:
        for rule in spec.get("egress", []):
            assert rule.get("ports"), "egress rules name their ports"
            assert {port["port"] for port in rule["ports"]} <= {53, 5671, 5672, *REDIS_PORTS}


def test_network_policy_lets_the_bridge_reach_redis() -> None:
    """With BRIDGE_DEDUP_URL set the bridge must reach Redis (and Sentinel): denied, it would
    publish without deduplication (BRIDGE_DEDUP_ON_ERROR=publish) and only log it."""
    spec = _only("NetworkPolicy")["spec"]
    assert "Egress" in spec["policyTypes"]
    rules = [
        rule
        for rule in spec["egress"]
        if REDIS_PORTS & {port["port"] for port in rule.get("ports", [])}
    ]
    assert len(rules) == 1, "one egress rule for Redis"
    (rule,) = rules
    assert {(port.get("protocol", "TCP"), port["port"]) for port in rule["ports"]} == {
        ("TCP", 6379),
        ("TCP", 26379),
    }
    assert rule.get("to") == [{"podSelector": {"matchLabels": REDIS_LABELS}}], (
        "only to the Redis pods of the bridge's namespace"
    )


def test_buffered_bodies_fit_in_the_memory_limit() -> None:
    limit = _container()["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    config = _config()
    budget = int(config["BRIDGE_MAX_BUFFERED_BYTES"])
    assert budget >= int(config["BRIDGE_MAX_BODY_BYTES"])
    # Measured (tests/test_flood.py): 60 MiB at rest, and under a flood of 500 connections
    # the budget's bodies plus about 50 KiB a connection.
    per_worker = budget + 25 * 2**20
    assert 64 * 2**20 + int(config["BRIDGE_WORKERS"]) * per_worker <= int(limit[:-2]) * 2**20 // 2


def test_example_ingress_routes_only_the_webhook_path() -> None:
    (ingress,) = _load_all(DEPLOY / "ingress.yaml")
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(ingress, desired_version=version, strict=True)
    assert ingress["metadata"]["labels"]["app.kubernetes.io/name"] == "webhook-bridge"
    assert "ingress.yaml" not in _kustomization()["resources"], "an example, with example hosts"
    service = _only("Service")
    [(port,)] = [service["spec"]["ports"]]
    paths = [path for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]]
    assert paths == [
        {
            "path": "/webhooks/openai",
            "pathType": "Exact",
            "backend": {
                "service": {"name": service["metadata"]["name"], "port": {"name": port["name"]}}
            },
        }
    ]
    assert "defaultBackend" not in ingress["spec"]
    body_size = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert int(body_size.removesuffix("k")) * 1024 == int(_config()["BRIDGE_MAX_BODY_BYTES"])


def _image_references() -> list[str]:
    images = []
    for doc in _manifests():
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in [*pod.get("containers", []), *pod.get("initContainers", [])]:
            images.append(container["image"])
    images += [s["image"] for s in _compose()["services"].values() if "image" in s]
    return images


def _pinned(reference: str) -> bool:
    if "@sha256:" in reference:
        return True
    name, _, tag = reference.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and any(c.isdigit() for c in tag)


def test_no_latest_or_untagged_images() -> None:
    images = _image_references()
    assert images
    unpinned = [image for image in images if not _pinned(image)]
    assert unpinned == []


_WHSEC = re.compile(r"whsec_([A-Za-z0-9+/]+={0,2})")


def _looks_like_real_key(value: str) -> bool:
    """True if a ``whsec_`` value base64-decodes to a key-sized secret (>= 24 bytes)."""
    for match in _WHSEC.finditer(value):
        encoded = match.group(1)
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(key) >= 24:
            return True
    return False


def test_placeholder_detector_catches_real_looking_keys() -> None:
    real_looking = "whsec_" + base64.b64encode(bytes(range(32))).decode()
    assert _looks_like_real_key(real_looking)
    assert _looks_like_real_key(f"key: {real_looking.rstrip('=')}_REPLACE_ME")
    assert not _looks_like_real_key("whsec_REPLACE_ME_WITH_THE_SIGNING_SECRET_FROM_OPENAI")


def test_secret_example_holds_placeholders_only() -> None:
    (secret,) = _load_all(DEPLOY / "secret.example.yaml")
    assert secret["kind"] == "Secret"
    assert secret["metadata"]["name"] == "webhook-bridge"
    values = dict(secret.get("stringData", {}))
    for key, encoded in secret.get("data", {}).items():
        values[key] = base64.b64decode(encoded).decode()
    assert set(values) == {"BRIDGE_WEBHOOK_SECRET", "BRIDGE_AMQP_URL"}
    for key, value in values.items():
        assert "REPLACE_ME" in value, f"{key} must be an obvious placeholder"
        assert not _looks_like_real_key(value), key
    password = urlsplit(values["BRIDGE_AMQP_URL"]).password
    assert password is not None
    assert "REPLACE_ME" in password


def test_no_real_looking_webhook_secret_in_deployment_files() -> None:
    paths = [
        *DEPLOY.rglob("*"),
        COMPOSE,
        DOCKERFILE,
        ROOT / ".dockerignore",
        ROOT / "README.md",
        *(ROOT / "docs").rglob("*.md"),
    ]
    offenders = [
        str(path.relative_to(ROOT))
        for path in paths
        if path.is_file() and _looks_like_real_key(path.read_text())
    ]
    assert offenders == []


# --------------------------------------------------------------------------- Compose


def test_compose_schema_is_the_vendored_specification() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    assert "draft-07" in schema["$schema"]
    assert schema["title"] == "Compose Specification"
    jsonschema.Draft7Validator.check_schema(schema)


def test_compose_file_validates_against_the_specification() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(_compose())
    ]
    assert errors == []
    # The validator does reject what the specification forbids.
    assert list(validator.iter_errors({"services": {"x": {"depends_on": {"y": {}}}}}))


def test_compose_wiring() -> None:
    rabbitmq = _service("rabbitmq")
    bridge = _service("bridge")
    consumer = _service("consumer")

    assert bridge["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert consumer["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert "build" in bridge
    assert consumer["image"] == bridge["image"]
    assert consumer["command"] == ["consume", "#"]
    assert bridge.get("command", ["serve"]) == ["serve"]
    assert sorted(str(port) for port in bridge["ports"]) == ["127.0.0.1:8081:8081", "8080:8080"]
    assert "BRIDGE_METRICS_PORT" not in bridge.get("environment", {}), "8081 is the default"
    for service in (bridge, consumer):
        assert ".env.bridge" in _env_files(service)
        assert str(service["environment"]["BRIDGE_DECLARE_TOPOLOGY"]).lower() == "false"

    test = rabbitmq["healthcheck"]["test"]
    command = " ".join(test) if isinstance(test, list) else test
    assert "rabbitmq-diagnostics" in command
    assert "ping" in command or "check_port_connectivity" in command

    mounts = {}
    for volume in rabbitmq["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = source
    assert "/etc/rabbitmq/definitions.json" in mounts
    assert (ROOT / mounts["/etc/rabbitmq/definitions.json"]).resolve() == DEFINITIONS
    config = (ROOT / mounts["/etc/rabbitmq/rabbitmq.conf"]).read_text()
    settings = {
        key.strip(): value.strip()
        for key, _, value in (
            line.partition("=")
            for line in config.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        )
    }
    assert settings["load_definitions"] == "/etc/rabbitmq/definitions.json"


def test_env_file_is_never_committed_or_built_in() -> None:
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert ".env.bridge" in ignored
    docker_ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env.bridge" in docker_ignored or ".env.*" in docker_ignored
    assert {".git", ".venv"} <= set(docker_ignored)


def _definitions() -> dict[str, Any]:
    definitions: dict[str, Any] = json.loads(DEFINITIONS.read_text())
    return definitions


def test_compose_users_are_the_definitions_users() -> None:
    users = {user["name"] for user in _definitions()["users"]}
    script = _unescape_compose(_service("rabbitmq-init")["command"][0])
    changed = set(re.findall(r"set_password (\S+) ", script))
    assert changed == users


def test_compose_init_sets_passwords_from_the_urls(tmp_path: Path) -> None:
    init = _service("rabbitmq-init")
    assert init["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert ".env.bridge" in _env_files(init)
    for service in ("bridge", "consumer", "hydrate"):
        condition = _service(service)["depends_on"]["rabbitmq-init"]["condition"]
        assert condition == "service_completed_successfully"
    entrypoint = init["entrypoint"]
    script = _unescape_compose(init["command"][0])
    log = tmp_path / "rabbitmqctl.log"
    _stub(tmp_path, "rabbitmqctl", f'echo "$*" >> "{log}"\n')
    env = {
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "BRIDGE_AMQP_URL": "amqp://webhook-bridge:b1d9e2@rabbitmq:5672/",
        "WEBHOOK_CONSUMER_AMQP_URL": "amqp://webhook-consumer:c0ffee42@rabbitmq:5672/%2F",
        "WEBHOOK_HYDRATE_AMQP_URL": "amqp://webhook-hydrate:5eed77@rabbitmq:5672/",
    }
    subprocess.run([*entrypoint, script], env=env, check=True, timeout=30)
    assert log.read_text().splitlines() == [
        "--node rabbit@rabbitmq await_startup",
        "--node rabbit@rabbitmq change_password webhook-bridge b1d9e2",
        "--node rabbit@rabbitmq change_password webhook-consumer c0ffee42",
        "--node rabbit@rabbitmq change_password webhook-hydrate 5eed77",
    ]

    log.unlink()
    env["BRIDGE_AMQP_URL"] = "amqp://rabbitmq:5672/"
    failed = subprocess.run(
        [*entrypoint, script], env=env, capture_output=True, text=True, timeout=30
    )
    assert failed.returncode != 0
    assert "no password" in failed.stderr
    assert "change_password" not in log.read_text()


def test_compose_consumer_connects_as_the_consumer_user(tmp_path: Path) -> None:
    consumer = _service("consumer")
    _stub(tmp_path, "webhook-bridge", 'echo "$BRIDGE_AMQP_URL"\nprintf "%s\\n" "$@"\n')
    argv = [_unescape_compose(part) for part in [*consumer["entrypoint"], *consumer["command"]]]
    env = {
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "BRIDGE_AMQP_URL": "amqp://webhook-bridge:b1d9e2@rabbitmq:5672/",
        "WEBHOOK_CONSUMER_AMQP_URL": "amqp://webhook-consumer:c0ffee42@rabbitmq:5672/",
    }
    result = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=30)
    assert result.stdout.splitlines() == [
        "amqp://webhook-consumer:c0ffee42@rabbitmq:5672/",
        "consume",
        "#",
    ]


# ------------------------------------------------------------------------ Dockerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def _dockerfile_stages() -> list[list[Instruction]]:
    """Instructions per build stage (continuation lines joined, comments dropped)."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    stages: list[list[Instruction]] = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        if not stages and instruction.keyword == "ARG":
            continue  # a global build argument, read by _global_build_args
        assert stages, "the Dockerfile must start with FROM (after global ARGs)"
        stages[-1].append(instruction)
    return stages


def _global_build_args() -> dict[str, str]:
    """The ``ARG name=default`` lines before the first FROM."""
    defaults = {}
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.upper().startswith("FROM "):
            break
        if line.upper().startswith("ARG "):
            name, _, default = line[4:].strip().partition("=")
            defaults[name] = default
    return defaults


def _base_image(stage: list[Instruction]) -> str:
    """The stage's FROM image, with global build arguments at their defaults."""
    words = [w for w in stage[0].arguments.split() if not w.startswith("--")]
    return re.sub(r"\$\{?(\w+)\}?", lambda match: _global_build_args()[match.group(1)], words[0])


def _arguments(stage: list[Instruction], keyword: str) -> list[str]:
    return [i.arguments for i in stage if i.keyword == keyword]


def test_dockerfile_is_multi_stage_with_pinned_bases() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2, "builder stage plus a runtime stage"
    earlier_stages: set[str] = set()
    for stage in stages:
        words = [w for w in stage[0].arguments.split() if not w.startswith("--")]
        image = _base_image(stage)
        if image.lower() not in earlier_stages:
            assert _pinned(image), f"FROM {image} is not pinned to an explicit version tag"
        if len(words) >= 3 and words[1].upper() == "AS":
            earlier_stages.add(words[2].lower())
    final = stages[-1]
    assert any("--from=" in copy for copy in _arguments(final, "COPY"))


def test_dockerfile_takes_the_python_image_for_both_stages() -> None:
    """``--build-arg PYTHON_IMAGE=...`` swaps the base of the builder and the runtime alike."""
    assert _global_build_args()["PYTHON_IMAGE"].partition("@sha256:")[0].endswith("-slim-bookworm")
    stages = _dockerfile_stages()
    assert [stage[0].arguments.split()[0] for stage in stages] == ["${PYTHON_IMAGE}"] * 2


def test_dockerfile_runtime_stage() -> None:
    final = _dockerfile_stages()[-1]
    users = _arguments(final, "USER")
    assert users, "the runtime stage must switch to a non-root user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"USER {users[-1]} is not a numeric uid"
    assert int(uid) != 0, "the runtime stage must not run as root"

    healthchecks = _arguments(final, "HEALTHCHECK")
    assert len(healthchecks) == 1
    assert "/healthz" in healthchecks[0]
    assert "BRIDGE_METRICS_PORT', '8081'" in healthchecks[0], "probes the operations port"
    assert "curl" not in healthchecks[0]
    assert "wget" not in healthchecks[0]

    assert [json.loads(a) for a in _arguments(final, "ENTRYPOINT")][-1] == ["webhook-bridge"]
    assert [json.loads(a) for a in _arguments(final, "CMD")][-1] == ["serve"]
    assert {"8080", "8081"} <= set(" ".join(_arguments(final, "EXPOSE")).split())

    env = " ".join(_arguments(final, "ENV"))
    assert re.search(r"\bPYTHONDONTWRITEBYTECODE=1\b", env)
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env)

    build_tools = re.compile(r"\b(gcc|g\+\+|build-essential|make|clang|python3?-dev|libc6?-dev)\b")
    for run in _arguments(final, "RUN"):
        if re.search(r"\b(apt-get|apt|apk)\s+(install|add)\b", run):
            assert not build_tools.search(run), f"build tools in the runtime image: {run}"


# ------------------------------------------------------------------ broker definitions


def _by_name(section: str) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in _definitions()[section]}


def test_definitions_exchanges() -> None:
    exchanges = _by_name("exchanges")
    main = exchanges[EXCHANGE]
    assert main["type"] == "topic"
    assert main["durable"] is True
    assert main["auto_delete"] is False
    assert main["arguments"] == {"alternate-exchange": UNROUTED}
    for name in (UNROUTED, QUARANTINE, DEAD_LETTER):
        assert exchanges[name]["type"] == "fanout", name
        assert exchanges[name]["durable"] is True, name
        assert exchanges[name]["auto_delete"] is False, name


def test_definitions_queues_and_bindings() -> None:
    queues = _by_name("queues")
    for name in (UNROUTED, QUARANTINE, DEAD_LETTER):
        assert queues[name]["durable"] is True, name
    for name in (UNROUTED, QUARANTINE):
        assert queues[name]["arguments"]["x-queue-type"] == "quorum", name
    assert queues[DEAD_LETTER]["arguments"].get("x-queue-type", "classic") == "classic"
    example = queues[EXAMPLE_QUEUE]
    assert example["durable"] is True
    assert example["auto_delete"] is False
    arguments = example["arguments"]
    assert arguments["x-queue-type"] == "quorum"
    assert arguments["x-overflow"] == "reject-publish"
    assert arguments["x-dead-letter-exchange"] == DEAD_LETTER
    # reject-publish only ever triggers with a length limit.
    assert arguments.get("x-max-length", 0) > 0 or arguments.get("x-max-length-bytes", 0) > 0
    assert DEAD_LETTER in _by_name("exchanges")

    bindings = {
        (b["source"], b["destination"], b["destination_type"], b["routing_key"])
        for b in _definitions()["bindings"]
    }
    assert bindings >= {
        (UNROUTED, UNROUTED, "queue", ""),
        (QUARANTINE, QUARANTINE, "queue", ""),
        (DEAD_LETTER, DEAD_LETTER, "queue", ""),
        (EXCHANGE, EXAMPLE_QUEUE, "queue", "batch.*"),
    }


def test_definitions_everything_in_the_default_vhost() -> None:
    definitions = _definitions()
    assert [vhost["name"] for vhost in definitions["vhosts"]] == ["/"]
    for section in ("permissions", "exchanges", "queues", "bindings"):
        for item in definitions[section]:
            assert item["vhost"] == "/", (section, item)


def test_definitions_users_have_no_password() -> None:
    users = _by_name("users")
    assert "guest" not in users
    assert BRIDGE_USER in users
    for name, user in users.items():
        assert user["password_hash"] == "", f"{name} must have no password hash in the repo"
        assert not user.get("password"), name
        assert user["tags"] in ([], ""), f"{name} must have no tags"


def _permissions(user: str) -> dict[str, str]:
    matches: list[dict[str, str]] = [p for p in _definitions()["permissions"] if p["user"] == user]
    (permission,) = matches
    assert permission["vhost"] == "/"
    return permission


def test_bridge_user_may_only_publish_to_its_three_exchanges() -> None:
    permission = _permissions(BRIDGE_USER)
    assert permission["configure"] == "^$"
    assert permission["read"] == "^$"
    write = re.compile(permission["write"])
    # RabbitMQ searches (unanchored) with the regex, so re.search is the faithful check.
    for name in (EXCHANGE, UNROUTED, QUARANTINE):
        assert write.search(name), name
    for name in (
        DEAD_LETTER,
        EXAMPLE_QUEUE,
        "amq.default",
        "amq.topic",
        "openai.webhooks.unrouted.extra",
        "openai.webhooksX",
        "openai-webhooks",
        "xopenai.webhooks",
        "",
    ):
        assert not write.search(name), name
    configure = re.compile(permission["configure"])
    assert not any(configure.search(name) for name in (EXCHANGE, UNROUTED, QUARANTINE))


def test_consumer_user_cannot_publish_to_the_bridge_exchanges() -> None:
    permission = _permissions(CONSUMER_USER)
    write = re.compile(permission["write"])
    configure = re.compile(permission["configure"])
    for name in (EXCHANGE, UNROUTED, QUARANTINE, DEAD_LETTER, EXAMPLE_QUEUE):
        assert not write.search(name), name
        assert not configure.search(name), name
    read = re.compile(permission["read"])
    assert read.search(EXCHANGE), "binding a queue needs read on the exchange"
    for name in (UNROUTED, QUARANTINE, DEAD_LETTER, EXAMPLE_QUEUE):
        assert not read.search(name), name
    # `consume` uses a temporary queue: server-named, or named by aio-pika's robust queue.
    for temporary in ("amq.gen-JzTY20BRgKO-HjmUJj0wLg", "amq_" + uuid.uuid4().hex):
        for regex in (configure, write, read):
            assert regex.search(temporary), (regex.pattern, temporary)


# ------------------------------------------------------------- real broker (rabbitmqctl)


@dataclass(frozen=True)
class ImportedDefinitions:
    """The repo's definitions imported into a throwaway vhost, users renamed to be unique."""

    vhost: str
    username: str
    password: str
    amqp_url: str
    consumer_username: str
    consumer_password: str
    consumer_amqp_url: str
    hydrate_amqp_url: str


def _rabbitmqctl(*args: str, check: bool = True, stdin: str | None = None) -> str:
    result = subprocess.run(
        ["rabbitmqctl", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"rabbitmqctl {args[0]} failed: {result.stderr or result.stdout}")
    return result.stdout


def _rows(*args: str) -> list[list[str]]:
    return [line.split("\t") for line in _rabbitmqctl("--silent", *args).splitlines() if line]


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def _broker_address() -> tuple[str, int]:
    url = urlsplit(os.environ.get("BRIDGE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    return url.hostname or "127.0.0.1", url.port or 5672


def _amqp_url(user: str, password: str, vhost: str) -> str:
    host, port = _broker_address()
    return f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/" + quote(
        vhost, safe=""
    )


def _rewrite(definitions: dict[str, Any], vhost: str, users: dict[str, str]) -> dict[str, Any]:
    """The same definitions in ``vhost`` (instead of "/") and with renamed users."""
    copy: dict[str, Any] = json.loads(json.dumps(definitions))
    assert [v["name"] for v in copy["vhosts"]] == ["/"]
    copy["vhosts"] = [{**copy["vhosts"][0], "name": vhost}]
    for user in copy["users"]:
        user["name"] = users[user["name"]]
    for section, items in copy.items():
        if section in ("vhosts", "users") or not isinstance(items, list):
            continue
        for item in items:
            if item.get("vhost") == "/":
                item["vhost"] = vhost
            if "user" in item:
                item["user"] = users[item["user"]]
    return copy


@contextmanager
def _import_definitions(*, set_passwords: bool) -> Iterator[ImportedDefinitions]:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not on PATH: no local RabbitMQ to import definitions into")
    token = secrets.token_hex(6)
    vhost = f"/deploy-test-{token}"
    users = {name: f"{name}-{token}" for name in _by_name("users")}
    passwords = {name: secrets.token_hex(24) for name in users.values()}
    try:
        _rabbitmqctl("add_vhost", vhost)
        # Through stdin: the packaged rabbitmqctl may drop root for the rabbitmq user, who
        # cannot read pytest's private temporary directories.
        rewritten = json.dumps(_rewrite(_definitions(), vhost, users))
        _rabbitmqctl("import_definitions", "--format", "json", stdin=rewritten)

        # The import runs asynchronously: wait for its last steps (permissions, bindings).
        def imported() -> bool:
            permitted = {row[0] for row in _rows("list_permissions", "-p", vhost)}
            bound = {
                (row[0], row[1], row[2])
                for row in _rows(
                    "list_bindings", "-p", vhost, "source_name", "destination_name", "routing_key"
                )
            }
            return (
                set(users.values()) <= permitted
                and (
                    EXCHANGE,
                    EXAMPLE_QUEUE,
                    "batch.*",
                )
                in bound
            )

        _wait_for(imported, f"the definitions to appear in vhost {vhost}")
        if set_passwords:
            for user, password in passwords.items():
                _rabbitmqctl("change_password", user, password)
        bridge, consumer, hydrate = users[BRIDGE_USER], users[CONSUMER_USER], users[HYDRATE_USER]
        yield ImportedDefinitions(
            vhost=vhost,
            username=bridge,
            password=passwords[bridge],
            amqp_url=_amqp_url(bridge, passwords[bridge], vhost),
            consumer_username=consumer,
            consumer_password=passwords[consumer],
            consumer_amqp_url=_amqp_url(consumer, passwords[consumer], vhost),
            hydrate_amqp_url=_amqp_url(hydrate, passwords[hydrate], vhost),
        )
    finally:
        _rabbitmqctl("delete_vhost", vhost, check=False)
        for user in users.values():
            _rabbitmqctl("delete_user", user, check=False)


@pytest.fixture
def imported_definitions() -> Iterator[ImportedDefinitions]:
    """deploy/rabbitmq/definitions.json in a fresh vhost, with random passwords set.

    ``amqp_url`` logs in as the (renamed) least-privilege bridge user; point the bridge at it
    with ``declare_topology=False``. The vhost and users are deleted afterwards.
    """
    with _import_definitions(set_passwords=True) as imported:
        yield imported


def test_rewrite_moves_everything_to_the_new_vhost() -> None:
    users = {name: f"{name}-x" for name in _by_name("users")}
    rewritten = _rewrite(_definitions(), "/elsewhere", users)
    text = json.dumps(rewritten)
    assert '"vhost": "/"' not in text
    assert '"name": "/"' not in text
    assert {u["name"] for u in rewritten["users"]} == set(users.values())
    assert {p["user"] for p in rewritten["permissions"]} <= set(users.values())
    assert len(rewritten["queues"]) == len(_definitions()["queues"])


async def _exercise_bridge_user(url: str) -> None:
    async with asyncio.timeout(30):
        connection = await aio_pika.connect(url)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            for name in (INGRESS, EXCHANGE, UNROUTED, QUARANTINE):
                await channel.declare_exchange(name, passive=True)
            # Where the bridge publishes with the archive on (as the ConfigMap sets it).
            ingress = await channel.get_exchange(INGRESS, ensure=False)
            quarantine = await channel.get_exchange(QUARANTINE, ensure=False)
            message = aio_pika.Message(b"{}", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await ingress.publish(message, routing_key="batch.completed", mandatory=True)
            # No queue binds this key: the alternate exchange keeps it (no basic.return).
            await ingress.publish(message, routing_key="no.such.event", mandatory=True)
            await quarantine.publish(message, routing_key="", mandatory=True)

            refused = await connection.channel()
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                await refused.declare_exchange("openai.webhooks.extra", durable=True)
        finally:
            await connection.close()


async def _exercise_consumer_user(consumer_url: str, bridge_url: str) -> None:
    """What ``consume '#'`` does: a temporary queue bound to the exchange, then reading it."""
    async with asyncio.timeout(30):
        consumer = await aio_pika.connect_robust(consumer_url)
        try:
            channel = await consumer.channel()
            queue = await channel.declare_queue(None, exclusive=True, auto_delete=True)
            await queue.bind(EXCHANGE, routing_key="#")
            bridge = await aio_pika.connect(bridge_url)
            try:
                publishing = await bridge.channel(publisher_confirms=True)
                topic = await publishing.get_exchange(EXCHANGE, ensure=False)
                await topic.publish(aio_pika.Message(b'{"seen": 1}'), routing_key="batch.failed")
            finally:
                await bridge.close()
            message = await queue.get(no_ack=True, fail=False)
            while message is None:
                await asyncio.sleep(0.05)
                message = await queue.get(no_ack=True, fail=False)
            assert message.body == b'{"seen": 1}'
            assert message.routing_key == "batch.failed"

            refused = await consumer.channel()
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                await refused.default_exchange.publish(aio_pika.Message(b"x"), routing_key="x")
        finally:
            await consumer.close()


@pytest.mark.broker
def test_definitions_import_into_rabbitmq(imported_definitions: ImportedDefinitions) -> None:
    vhost = imported_definitions.vhost
    exchanges = {
        row[0]: row[1:]
        for row in _rows("list_exchanges", "-p", vhost, "name", "type", "durable", "arguments")
    }
    assert exchanges[EXCHANGE][:2] == ["topic", "true"]
    assert UNROUTED in exchanges[EXCHANGE][2]
    assert "alternate-exchange" in exchanges[EXCHANGE][2]
    for name in (UNROUTED, QUARANTINE, DEAD_LETTER):
        assert exchanges[name][:2] == ["fanout", "true"], name

    queues = {
        row[0]: row[1:]
        for row in _rows("list_queues", "-p", vhost, "name", "type", "durable", "arguments")
    }
    for name in (UNROUTED, QUARANTINE):
        assert queues[name][:2] == ["quorum", "true"], name
    assert queues[DEAD_LETTER][:2] == ["classic", "true"]
    assert queues[EXAMPLE_QUEUE][:2] == ["quorum", "true"]
    assert "reject-publish" in queues[EXAMPLE_QUEUE][2]
    assert DEAD_LETTER in queues[EXAMPLE_QUEUE][2]

    permissions = {row[0]: row[1:] for row in _rows("list_permissions", "-p", vhost)}
    assert permissions[imported_definitions.username] == [
        "^$",
        _permissions(BRIDGE_USER)["write"],
        "^$",
    ]
    assert "guest" not in permissions

    asyncio.run(_exercise_bridge_user(imported_definitions.amqp_url))

    def delivered() -> bool:
        counts = {row[0]: row[1] for row in _rows("list_queues", "-p", vhost, "name", "messages")}
        return counts == {
            EXAMPLE_QUEUE: "1",
            UNROUTED: "1",
            QUARANTINE: "1",
            DEAD_LETTER: "0",
            ARCHIVE: "3",  # the two through the ingress, and the quarantined one
            # batch.completed is hydratable: it waits for the hydration worker too.
            f"{EXCHANGE}.hydrate": "1",
            f"{EXCHANGE}.objects.unrouted": "0",
            f"{EXCHANGE}.objects.failed": "0",
        }

    _wait_for(delivered, "one message each in the example, unrouted and quarantine queues")

    asyncio.run(
        _exercise_consumer_user(
            imported_definitions.consumer_amqp_url, imported_definitions.amqp_url
        )
    )


async def _login(url: str) -> None:
    async with asyncio.timeout(30):
        connection = await aio_pika.connect(url)
        await connection.close()


@pytest.mark.broker
def test_imported_users_cannot_log_in_until_a_password_is_set() -> None:
    with _import_definitions(set_passwords=False) as imported:
        for password in ("", "guest", imported.password):
            url = _amqp_url(imported.username, password, imported.vhost)
            with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
                asyncio.run(_login(url))
        _rabbitmqctl("change_password", imported.username, imported.password)
        asyncio.run(_login(imported.amqp_url))


@pytest.mark.broker
async def test_bridge_with_operator_managed_topology_becomes_ready_and_publishes(
    imported_definitions: ImportedDefinitions,
    start_bridge: Callable[..., BridgeProcess],
    signer: Signer,
) -> None:
    """The least-privilege user, topology declaration off: ready, publishing, nothing declared."""
    bridge = start_bridge(
        exchange=EXCHANGE,
        BRIDGE_AMQP_URL=imported_definitions.amqp_url,
        BRIDGE_DECLARE_TOPOLOGY="false",
    )
    await bridge.wait_ready()
    batch = sample_body("batch.completed")
    # Bound by no queue of the definitions (response.* is: the hydration queue's).
    unbound = sample_body("eval.run.succeeded")
    async with aiohttp.ClientSession() as session:
        for body in (batch, unbound):
            async with session.post(bridge.url, data=body, headers=signer.headers(body)) as answer:
                assert answer.status == 200

    vhost = imported_definitions.vhost
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    inspector = await aio_pika.connect(AMQP_URL.rstrip("/") + "/" + quote(vhost, safe=""))
    try:
        channel = await inspector.channel()
        example = await channel.get_queue("billing.batch-outcomes", ensure=False)
        unrouted = await channel.get_queue(UNROUTED, ensure=False)
        batch_message = await example.get(no_ack=True, fail=True, timeout=10)
        unrouted_message = await unrouted.get(no_ack=True, fail=True, timeout=10)
    finally:
        await inspector.close()
    assert batch_message.body == batch
    assert batch_message.routing_key == "batch.completed"
    assert unrouted_message.body == unbound
    assert "topology checked" in bridge.log_path.read_text()
