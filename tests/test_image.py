"""The container image, built from the Dockerfile with buildah and run as it ships.

The build uses the compose file's bridge service definition (Dockerfile, context, image
name), with ``--build-arg PYTHON_IMAGE`` pointing at a debootstrapped bookworm base
(:mod:`tests.image`) because no registry is reachable. The container then runs with
``buildah run --isolation chroot`` on the host network, against the host's RabbitMQ,
with the image's own entrypoint, command and user.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import yaml
from packaging.utils import canonicalize_name

from bench.processes import descendants
from bridge.samples import sample_body
from bridge.tracing import parse_traceparent
from tests.conftest import (
    AMQP_URL,
    BridgeProcess,
    Broker,
    Signer,
    free_port,
    post_webhook,
    unique_name,
)
from tests.image import BUILD_TIMEOUT, BaseRecipe, ensure_base, tools_missing
from tests.pins import IMAGE_CONSTRAINTS, read_pins

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.image,
    pytest.mark.broker,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.geteuid() != 0, reason="buildah chroot builds need root"),
    pytest.mark.skipif(bool(tools_missing()), reason=f"not installed: {tools_missing()}"),
]


def _compose_bridge_build() -> tuple[str, Path, Path, set[str]]:
    """Image name, Dockerfile, context and build argument names of compose's bridge."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["bridge"]
    build = service["build"]
    context = (ROOT / build.get("context", ".")).resolve()
    return (
        service["image"],
        context / build.get("dockerfile", "Dockerfile"),
        context,
        set(build.get("args", {})),
    )


@dataclass(frozen=True)
class BuiltImage:
    reference: str
    config: dict[str, Any]

    @property
    def argv(self) -> list[str]:
        return [*self.config["Entrypoint"], *self.config["Cmd"]]


@pytest.fixture(scope="module")
def image() -> BuiltImage:
    name, dockerfile, context, build_args = _compose_bridge_build()
    assert "PYTHON_IMAGE" in build_args, "compose must pass the same build argument as this test"
    base = ensure_base(BaseRecipe.for_this_machine())
    subprocess.run(
        [
            "buildah", "bud", "--isolation", "chroot", "--layers", "--format", "docker",
            "--build-arg", f"PYTHON_IMAGE={base}", "--tag", name, "--file", str(dockerfile),
            str(context),
        ],
        check=True, capture_output=True, timeout=BUILD_TIMEOUT,
    )  # fmt: skip
    inspected = subprocess.run(
        ["buildah", "inspect", "--type", "image", name],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    config: dict[str, Any] = json.loads(inspected.stdout)["Docker"]["config"]
    return BuiltImage(name, config)


def _uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    return int(line.split()[1])  # the real uid; effective and saved follow it here


def _serving_process(runner: subprocess.Popen[str]) -> int:
    """The Python process serving inside the container (below buildah's chroot helper)."""
    for pid in reversed(descendants(runner.pid)):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"python") and b"serve" in argv:
                return pid
    raise AssertionError("no serving python process below buildah run")


@contextlib.contextmanager
def _container(image: BuiltImage) -> Iterator[str]:
    name = f"webhook-bridge-test-{uuid.uuid4().hex[:12]}"
    subprocess.run(
        ["buildah", "from", "--pull-never", "--name", name, image.reference],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    try:
        yield name
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True, timeout=120, check=False)


def _run_entrypoint(
    image: BuiltImage, container: str, secrets_dir: Path, settings: dict[str, str], log: IO[str]
) -> subprocess.Popen[str]:
    """The image's entrypoint and command, as its configured user, on the host network."""
    return subprocess.Popen(
        [
            "buildah", "run", "--isolation", "chroot", "--network", "host",
            "--volume", f"{secrets_dir}:/run/secrets/webhook-bridge:ro",
            *(f"--env={name}={value}" for name, value in settings.items()),
            container, "--", *image.argv,
        ],
        stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _readable_secrets_dir(directory: Path, signer: Signer) -> Path:
    """A secrets directory the image's non-root user can read, like a mounted Secret."""
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    secret = directory / "BRIDGE_WEBHOOK_SECRET"
    secret.write_text(signer.secret)
    secret.chmod(0o644)
    return directory


# What the image's venv holds, and the values its pins' environment markers are read against.
INSTALLED_PROBE = """
import importlib.metadata, json, platform, sys
print(json.dumps({
    "environment": {
        "python_version": "%d.%d" % sys.version_info[:2],
        "python_full_version": platform.python_version(),
        "sys_platform": sys.platform,
        "platform_system": platform.system(),
        "platform_machine": platform.machine(),
        "implementation_name": sys.implementation.name,
        "platform_python_implementation": platform.python_implementation(),
    },
    "installed": {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()},
}))
"""
# Installed from the pins to build the wheel, then removed from the image.
WHEEL_BUILD_TOOLS = {"setuptools", "wheel"}


def test_image_runs_exactly_the_hashed_pins(image: BuiltImage) -> None:
    with _container(image) as container:
        probe = subprocess.run(
            ["buildah", "run", "--isolation", "chroot", container, "--",
             "/opt/venv/bin/python", "-c", INSTALLED_PROBE],
            check=True, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    found = json.loads(probe.stdout)
    installed = {canonicalize_name(name): v for name, v in found["installed"].items()}
    assert installed.pop(canonicalize_name("openai-webhook-bridge")) == "0.1.0"
    pinned = {
        pin.name: str(pin.version)
        for pin in read_pins(IMAGE_CONSTRAINTS)
        if pin.applies(found["environment"]) and pin.name not in WHEEL_BUILD_TOOLS
    }
    assert installed == pinned


def test_compose_builds_the_image_this_test_builds() -> None:
    name, dockerfile, context, build_args = _compose_bridge_build()
    assert name == "openai-webhook-bridge:0.1.0"
    assert dockerfile == ROOT / "Dockerfile"
    assert context == ROOT
    assert build_args == {"PYTHON_IMAGE"}


async def test_image_serves_as_non_root_publishes_and_drains_on_sigterm(
    image: BuiltImage, broker: Broker, signer: Signer, tmp_path: Path
) -> None:
    assert image.argv == ["webhook-bridge", "serve"]
    user = image.config["User"]
    assert user.split(":")[0] not in ("", "0", "root")

    exchange = unique_name("test.image")
    broker.created_exchanges += [exchange, f"{exchange}.unrouted", f"{exchange}.quarantine"]
    broker.created_queues += [f"{exchange}.unrouted", f"{exchange}.quarantine"]
    secrets_dir = _readable_secrets_dir(tmp_path / "secrets", signer)
    port, operations_port = free_port(), free_port()
    settings = {
        "BRIDGE_AMQP_URL": AMQP_URL,
        "BRIDGE_EXCHANGE": exchange,
        "BRIDGE_HOST": "127.0.0.1",
        "BRIDGE_PORT": str(port),
        "BRIDGE_METRICS_PORT": str(operations_port),
        "BRIDGE_LOG_FORMAT": "json",
    }
    log_path = tmp_path / "container.log"
    with _container(image) as container, log_path.open("w") as log:
        runner = _run_entrypoint(image, container, secrets_dir, settings, log)
        bridge = BridgeProcess(runner, port, exchange, log_path, operations_port)
        try:
            await bridge.wait_ready(timeout=60)
            serving = _serving_process(runner)
            assert _uid(serving) == int(user.split(":")[0]) != 0
            queue = await broker.bind_queue(exchange, "#")  # the bridge declared the exchange

            body = sample_body("batch.completed")
            headers = signer.headers(body)
            assert await post_webhook(bridge.url, body, headers) == 200
            message = await broker.get(queue, timeout=10)
            assert message.body == body
            assert message.routing_key == "batch.completed"
            assert message.message_id == headers["webhook-id"]
            traceparent = message.headers["traceparent"]
            assert isinstance(traceparent, str)
            assert parse_traceparent(traceparent) == traceparent

            os.kill(serving, signal.SIGTERM)
            assert runner.wait(timeout=60) == 0
        finally:
            if runner.poll() is None:
                # Killing buildah alone leaves the container's processes serving, orphaned.
                for pid in descendants(runner.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                runner.kill()
                runner.wait()
    log_text = log_path.read_text()
    assert "draining in-flight requests" in log_text
    assert "stopped" in log_text
    assert signer.secret not in log_text
    assert await broker.drain(queue) == [], "exactly one message per webhook-id"
