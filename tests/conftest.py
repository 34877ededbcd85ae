"""Shared fixtures: signing like OpenAI, settings with unique names, a real broker to inspect."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aiohttp import web
from aiohttp.test_utils import TestClient
from pamqp.commands import Basic

from bridge.frames import MessageProperties
from bridge.publisher import AmqpPublisher, Outcome, OutgoingMessage, Topology
from bridge.settings import Settings, load_settings
from bridge.signature import decode_secret, sign
from tests.brokers import (
    MACHINE_BROKER,
    RELEASE_IDS,
    RabbitMQ,
    release_named,
    running_broker,
    testing_against,
)

# The broker under test: the machine's, or another release's while a test runs against it.
AMQP_URL = MACHINE_BROKER.amqp_url
# Tests with these marks run against the machine's broker only: the installed packages, the
# container image and the load and benchmark runs measure the bridge, not the broker, and
# the cluster scenarios start clusters of both releases themselves (tests/test_cluster.py).
MACHINE_BROKER_ONLY = ("install", "image", "cluster")

# Fixtures shared by the load tests, the installed-package tests and the cluster scenarios,
# in the modules that define the sender, the install profiles and the cluster.
pytest_plugins = ("tests.history", "tests.install_profiles", "tests.cluster")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that needs the broker runs against each release (``-k rabbitmq3.10`` picks
    one): all of them against one release, then all against the next."""
    definition = metafunc.definition
    if any(definition.get_closest_marker(name) for name in MACHINE_BROKER_ONLY):
        return
    if definition.get_closest_marker("broker") or "broker" in metafunc.fixturenames:
        metafunc.parametrize("rabbitmq", RELEASE_IDS, indirect=True, scope="session")


@pytest.fixture(scope="session", autouse=True)
def rabbitmq(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RabbitMQ]:
    """The broker a test runs against: the machine's, unless the test is parametrised with
    another release, whose node starts before the first such test and stops after the last.
    While it runs, every ``AMQP_URL`` imported from here, ``BRIDGE_TEST_AMQP_URL`` and the
    ``rabbitmqctl`` on PATH lead to it."""
    release = release_named(getattr(request, "param", MACHINE_BROKER.id))
    if release is MACHINE_BROKER.release:
        yield MACHINE_BROKER
        return
    with running_broker(release) as broker, pointing_tests_at(broker, tmp_path_factory):
        yield broker


@contextlib.contextmanager
def pointing_tests_at(broker: RabbitMQ, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch, testing_against(broker):
        # Test modules import the URL by name; each copy of it follows the broker under test.
        for module in list(sys.modules.values()):
            if module.__name__.startswith("tests.") and (
                getattr(module, "AMQP_URL", None) == MACHINE_BROKER.amqp_url
            ):
                patch.setattr(module, "AMQP_URL", broker.amqp_url)
        patch.setenv("BRIDGE_TEST_AMQP_URL", broker.amqp_url)
        ctl_directory = tmp_path_factory.mktemp(f"{broker.id}-bin")
        broker.write_ctl_program(ctl_directory)
        patch.setenv("PATH", f"{ctl_directory}{os.pathsep}{os.environ['PATH']}")
        yield


def pamqp_properties(properties: MessageProperties) -> Basic.Properties:
    """The bridge's message properties as pamqp/aiormq spell them."""
    return Basic.Properties(
        content_type=properties.content_type,
        headers=dict(properties.headers) or None,
        delivery_mode=properties.delivery_mode,
        message_id=properties.message_id,
        timestamp=(
            None
            if properties.timestamp is None
            else datetime.fromtimestamp(properties.timestamp, tz=UTC)
        ),
        message_type=properties.message_type,
        app_id=properties.app_id,
    )


def new_secret() -> str:
    """A throwaway ``whsec_`` secret, made fresh for each test run."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def unique_name(prefix: str = "test") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


@dataclass
class Signer:
    """Signs webhooks the way OpenAI does, with one secret."""

    secret: str = field(default_factory=new_secret)
    clock: Callable[[], float] = time.time

    def headers(
        self,
        body: bytes,
        *,
        webhook_id: str | None = None,
        timestamp: int | None = None,
    ) -> dict[str, str]:
        webhook_id = webhook_id or f"wh_{uuid.uuid4().hex}"
        timestamp = int(self.clock()) if timestamp is None else timestamp
        return {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(decode_secret(self.secret), webhook_id, timestamp, body),
            "content-type": "application/json",
        }


@pytest.fixture
def signer() -> Signer:
    return Signer()


async def until_publisher_ready(publisher: AmqpPublisher, timeout: float) -> None:
    """Wait until the publisher is connected with its topology (fails after ``timeout``)."""
    async with asyncio.timeout(timeout):
        while not publisher.ready:
            await asyncio.sleep(0.05)


def make_settings(signer: Signer, **overrides: Any) -> Settings:
    return load_test_settings(None, **{"webhook_secret": signer.secret, **overrides})


def load_test_settings(secrets_dir: Path | None, **overrides: Any) -> Settings:
    """The bridge's settings for a test: the local broker, a new exchange, short timeouts."""
    values: dict[str, Any] = {
        "amqp_url": AMQP_URL,
        "exchange": unique_name("test.webhooks"),
        "publish_timeout": 2.0,
        "drain_timeout": 5.0,
        # One port for webhooks and /healthz, /readyz, /metrics unless a test asks otherwise.
        "metrics_port": 0,
    }
    values.update(overrides)
    return load_settings(secrets_dir=secrets_dir, **values)


@pytest.fixture
def settings(signer: Signer) -> Settings:
    return make_settings(signer)


@dataclass
class FakePublisher:
    """Records publishes; answers with ``outcome`` after ``delay``, or raises ``error``."""

    ready: bool = True
    connected: bool = True
    outcome: Outcome | None = None
    error: Exception | None = None
    delay: float = 0.0
    published: list[OutgoingMessage] = field(default_factory=list)

    async def publish(self, message: OutgoingMessage) -> Outcome:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        self.published.append(message)
        if self.outcome is not None:
            return self.outcome
        return Outcome.QUARANTINED if message.quarantined else Outcome.PUBLISHED


@pytest.fixture
def fake_publisher() -> FakePublisher:
    return FakePublisher()


@dataclass
class Broker:
    """A plain connection to the test RabbitMQ for binding queues and reading what arrived."""

    connection: AbstractRobustConnection
    channel: AbstractChannel
    created_queues: list[str] = field(default_factory=list)
    created_exchanges: list[str] = field(default_factory=list)

    async def bind_queue(self, exchange: str, *patterns: str) -> str:
        """Bind a new durable queue to ``exchange`` (declared if needed) for ``patterns``."""
        name = unique_name("test.queue")
        queue = await self.channel.declare_queue(name, durable=True)
        self.created_queues.append(name)
        for pattern in patterns:
            await queue.bind(exchange, routing_key=pattern)
        return name

    async def get(self, queue_name: str, timeout: float = 5.0) -> AbstractIncomingMessage:
        """Wait for the next message on ``queue_name`` and acknowledge it."""
        deadline = time.monotonic() + timeout
        while True:
            async with self.connection.channel() as channel:
                queue = await channel.get_queue(queue_name, ensure=False)
                message = await queue.get(no_ack=True, fail=False)
            if message is not None:
                return message
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing arrived on {queue_name} within {timeout} s")
            await asyncio.sleep(0.02)

    async def drain(self, queue_name: str) -> list[AbstractIncomingMessage]:
        """Every message now on ``queue_name`` (on a fresh connection, so it works after a
        test has stopped, restarted or closed connections of the broker)."""
        messages = []
        async with fresh_channel() as channel:
            queue = await channel.get_queue(queue_name, ensure=False)
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                messages.append(message)
        return messages

    def forget_topology(self, topology: Topology) -> None:
        """Delete the bridge's exchanges and queues for ``topology`` when the test ends."""
        self.created_exchanges += [
            topology.exchange,
            topology.unrouted_exchange,
            topology.quarantine_exchange,
            topology.ingress_exchange,  # with the archive on
        ]
        self.created_queues += [
            topology.unrouted_exchange,
            topology.quarantine_exchange,
            topology.archive_stream,
        ]

    async def cleanup(self) -> None:
        async with fresh_channel() as channel:
            for queue in self.created_queues:
                with contextlib.suppress(Exception):
                    await channel.queue_delete(queue)
            for exchange in self.created_exchanges:
                with contextlib.suppress(Exception):
                    await channel.exchange_delete(exchange)


@contextlib.asynccontextmanager
async def fresh_channel(timeout: float = 30.0) -> AsyncIterator[AbstractChannel]:
    """A channel on a new connection, retried until the broker answers: a robust connection
    that saw the broker go away may still be between reconnect attempts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = await aio_pika.connect(AMQP_URL, timeout=5)
            break
        except (ConnectionError, OSError, aio_pika.exceptions.AMQPError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    async with connection, connection.channel() as channel:
        yield channel


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    connection = await aio_pika.connect_robust(AMQP_URL, timeout=10)
    channel = await connection.channel()
    instance = Broker(connection, channel)
    try:
        yield instance
    finally:
        async with asyncio.timeout(30):
            await instance.cleanup()
            await connection.close()


@pytest.fixture
def broker_topology(settings: Settings, broker: Broker) -> Topology:
    topology = Topology.from_settings(settings)
    broker.forget_topology(topology)
    return topology


Client = TestClient[web.Request, web.Application]
AiohttpClient = Callable[[web.Application], Awaitable[Client]]


async def post_webhook(url: str, body: bytes, headers: dict[str, str]) -> int:
    """POST one webhook on a fresh connection; the answer's status."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as response,
    ):
        return response.status


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class BridgeProcess:
    """``webhook-bridge serve`` running as a child process, configured only by environment."""

    process: subprocess.Popen[str]
    port: int
    exchange: str
    log_path: Path
    operations_port: int | None = None  # BRIDGE_METRICS_PORT; None: the webhook port
    host: str = "127.0.0.1"  # another for a bridge in a network namespace of its own

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/webhooks/openai"

    async def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"bridge exited early: {self.process.returncode}")
                with contextlib.suppress(aiohttp.ClientError):
                    readyz = f"http://{self.host}:{self.operations_port or self.port}/readyz"
                    async with session.get(readyz) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise AssertionError("bridge did not become ready")

    async def post_signed(self, signer: Signer, body: bytes) -> int:
        return await post_webhook(self.url, body, signer.headers(body))

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout=timeout)


def bridge_environment(
    signer: Signer, exchange: str, port: int, **extra: str | None
) -> dict[str, str]:
    """The environment of a bridge process; an ``extra`` value of None unsets the variable."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("BRIDGE_")}
    environment.update(
        BRIDGE_WEBHOOK_SECRET=signer.secret,
        BRIDGE_AMQP_URL=AMQP_URL,
        BRIDGE_EXCHANGE=exchange,
        BRIDGE_HOST="127.0.0.1",
        BRIDGE_PORT=str(port),
        BRIDGE_METRICS_PORT="0",
        BRIDGE_LOG_FORMAT="json",
        BRIDGE_DRAIN_TIMEOUT="10",
    )
    for name, value in extra.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return environment


@pytest.fixture
def start_bridge(
    signer: Signer, broker: Broker, tmp_path: Path
) -> Iterator[Callable[..., BridgeProcess]]:
    """Start ``webhook-bridge serve`` processes; their logs go to files under ``tmp_path``."""
    started: list[BridgeProcess] = []

    def start(exchange: str | None = None, **extra: str | None) -> BridgeProcess:
        exchange = exchange or unique_name("test.webhooks")
        broker.forget_topology(Topology(exchange, f"{exchange}.unrouted", f"{exchange}.quarantine"))
        port = free_port()
        log_path = tmp_path / f"bridge-{len(started)}.log"
        log = log_path.open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve"],
            env=bridge_environment(signer, exchange, port, **extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log.close()  # the child has its own descriptor
        bridge = BridgeProcess(process, port, exchange, log_path)
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.stop(signal.SIGKILL)
