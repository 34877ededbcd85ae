"""Webhook secrets reloaded without a restart: from the secrets file (polled, or on SIGHUP),
never failing open, while a real ``webhook-bridge serve`` keeps answering."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from bridge.app import INGRESS, create_app
from bridge.samples import new_webhook_id, sample_body
from bridge.secrets import (
    SECRET_FILE_NAME,
    SecretSource,
    locate_secret_source,
    write_secret_file,
)
from bridge.server import reload_secrets_on_change
from tests.conftest import (
    AiohttpClient,
    BridgeProcess,
    Broker,
    Client,
    FakePublisher,
    Signer,
    make_settings,
    post_webhook,
)
from tests.test_cli import listening_workers


class MountedSecret:
    """A directory laid out as Kubernetes mounts a Secret: the file is a link through
    ``..data``, and an update writes a new timestamped directory and swaps ``..data``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(exist_ok=True)

    def write(self, content: str) -> None:
        stamp = self.directory / f"..{datetime.now(tz=UTC):%Y_%m_%d_%H_%M_%S.%f}"
        stamp.mkdir()
        (stamp / SECRET_FILE_NAME).write_text(content)
        data = self.directory / "..data"
        previous = data.resolve() if data.is_symlink() else None
        swap = self.directory / "..data_tmp"
        swap.symlink_to(stamp.name)
        os.replace(swap, data)
        link = self.directory / SECRET_FILE_NAME
        if not link.is_symlink():
            link.symlink_to(f"..data/{SECRET_FILE_NAME}")
        if previous is not None:
            shutil.rmtree(previous)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 if absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == (f"{name}{{{wanted}}}" if labels else name):
            return float(value)
    return 0.0


async def scrape(client: Client) -> str:
    response = await client.get("/metrics")
    return await response.text()


async def post(client: Client, signer: Signer) -> int:
    body = sample_body("batch.completed")
    response = await client.post("/webhooks/openai", data=body, headers=signer.headers(body))
    return response.status


async def eventually(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@dataclass
class Reloading:
    client: Client
    secret_file: Path
    publisher: FakePublisher


@pytest.fixture
async def reloading(
    aiohttp_client: AiohttpClient, signer: Signer, fake_publisher: FakePublisher, tmp_path: Path
) -> Reloading:
    """An app whose secrets come from a file polled every 50 ms."""
    secret_file = tmp_path / SECRET_FILE_NAME
    write_secret_file(secret_file, [signer.secret])
    settings = make_settings(signer, secrets_poll_interval=0.05)
    app = create_app(settings, fake_publisher)
    reload_secrets_on_change(app, settings, SecretSource("the test file", secret_file))
    return Reloading(await aiohttp_client(app), secret_file, fake_publisher)


async def test_a_new_list_applies_to_the_next_requests(
    reloading: Reloading, signer: Signer
) -> None:
    new = Signer()
    assert await post(reloading.client, new) == 401
    write_secret_file(reloading.secret_file, [new.secret, signer.secret])
    ingress = reloading.client.app[INGRESS]
    await eventually(lambda: ingress.verifiers[None].secret_count == 2)
    assert await post(reloading.client, new) == 200
    assert await post(reloading.client, signer) == 200
    metrics = await scrape(reloading.client)
    assert metric(metrics, "webhook_bridge_secret_reloads_total", result="applied") == 1
    assert metric(metrics, "webhook_bridge_secret_matches_total", secret_index="0") == 1
    assert metric(metrics, "webhook_bridge_secret_matches_total", secret_index="1") == 1

    write_secret_file(reloading.secret_file, [new.secret])
    await eventually(lambda: ingress.verifiers[None].secret_count == 1)
    assert await post(reloading.client, signer) == 401
    assert await post(reloading.client, new) == 200
    metrics = await scrape(reloading.client)
    assert metric(metrics, "webhook_bridge_secret_reloads_total", result="applied") == 2
    assert metric(metrics, "webhook_bridge_secret_reloads_total", result="refused") == 0


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\n",
        b"whsec_***not-base64***",
        b"whsec_c2l4dGVlbi1ieXRlLWtleQ==",  # 16 bytes
        b"\xff\xfe not UTF-8",
        "new-then-short",
        "directory",
    ],
    ids=["empty", "blank", "undecodable", "short", "not-utf8", "one-bad-of-two", "unreadable"],
)
async def test_an_unusable_file_is_refused_and_the_last_good_list_stays(
    reloading: Reloading,
    signer: Signer,
    content: bytes | str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.secrets")
    new = Signer()
    if content == "new-then-short":
        reloading.secret_file.write_text(f"{new.secret},whsec_c2hvcnQ=")
    elif content == "directory":
        reloading.secret_file.unlink()
        reloading.secret_file.mkdir()
    else:
        assert isinstance(content, bytes)
        reloading.secret_file.write_bytes(content)
    client = reloading.client
    await eventually(lambda: "refused the webhook secrets" in caplog.text)
    await asyncio.sleep(0.3)  # several more polls of the same content
    refusals = [record for record in caplog.records if "refused" in record.getMessage()]
    assert len(refusals) == 1, "one error line per change, not one per poll"
    assert refusals[0].levelname == "ERROR"
    assert "the 1 secret in force stays" in refusals[0].getMessage()
    assert signer.secret.removeprefix("whsec_")[:12] not in caplog.text
    assert new.secret.removeprefix("whsec_")[:12] not in caplog.text
    assert await post(client, signer) == 200
    assert await post(client, new) == 401
    metrics = await scrape(client)
    assert metric(metrics, "webhook_bridge_secret_reloads_total", result="refused") == 1
    assert metric(metrics, "webhook_bridge_secret_reloads_total", result="applied") == 0

    if content == "directory":
        reloading.secret_file.rmdir()
    write_secret_file(reloading.secret_file, [new.secret])
    await eventually(lambda: "reloaded" in caplog.text)
    assert await post(client, new) == 200
    assert await post(client, signer) == 401


# The processes below are real ``webhook-bridge serve`` processes with a real broker.


def log_entries(bridge: BridgeProcess) -> list[dict[str, object]]:
    return [json.loads(line) for line in bridge.log_path.read_text().splitlines() if line]


def logged(bridge: BridgeProcess, start: str) -> list[dict[str, object]]:
    return [entry for entry in log_entries(bridge) if str(entry["message"]).startswith(start)]


async def post_new_connection(bridge: BridgeProcess, signer: Signer) -> tuple[str, int]:
    body = sample_body("response.completed")
    webhook_id = new_webhook_id()
    status = await post_webhook(bridge.url, body, signer.headers(body, webhook_id=webhook_id))
    return webhook_id, status


async def bridge_metrics(bridge: BridgeProcess) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{bridge.port}/metrics") as response,
    ):
        return await response.text()


@dataclass
class Attempt:
    signer: str
    webhook_id: str
    status: int
    sent: float
    answered: float


@dataclass
class Load:
    """Concurrent webhooks on kept-alive connections, each signed by the signers chosen now."""

    url: str
    signers: dict[str, Signer]
    signing_with: list[str] = field(default_factory=lambda: ["old"])
    attempts: list[Attempt] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, concurrency: int = 8) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            await asyncio.gather(*(self._sender(session, index) for index in range(concurrency)))

    async def _sender(self, session: aiohttp.ClientSession, index: int) -> None:
        sent_count = 0
        while not self.stopping.is_set():
            name = self.signing_with[(index + sent_count) % len(self.signing_with)]
            sent_count += 1
            self.attempts.append(await self.send(session, name))

    async def send(self, session: aiohttp.ClientSession, name: str) -> Attempt:
        body = sample_body("batch.completed")
        webhook_id = new_webhook_id()
        headers = self.signers[name].headers(body, webhook_id=webhook_id)
        sent = time.monotonic()
        async with session.post(self.url, data=body, headers=headers) as response:
            await response.read()
            return Attempt(name, webhook_id, response.status, sent, time.monotonic())

    async def until(self, name: str, status: int, timeout: float = 15.0) -> float:
        """Send signed by ``name`` until answered ``status``; when that answer came."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                attempt = await self.send(session, name)
                self.attempts.append(attempt)
                if attempt.status == status:
                    return attempt.answered
                await asyncio.sleep(0.05)
        raise AssertionError(f"{name}-signed webhooks never got {status}")


@pytest.mark.broker
async def test_rotation_under_load_in_a_kubernetes_mounted_secret(
    start_bridge: Callable[..., BridgeProcess], broker: Broker, tmp_path: Path
) -> None:
    old, new = Signer(), Signer()
    mount = MountedSecret(tmp_path / "secrets")
    mount.write(old.secret)
    bridge = start_bridge(
        BRIDGE_SECRETS_DIR=str(mount.directory),
        BRIDGE_WEBHOOK_SECRET=None,
        BRIDGE_SECRETS_POLL_INTERVAL="0.5",
    )
    await bridge.wait_ready()
    pid = bridge.process.pid
    queue = await broker.bind_queue(bridge.exchange, "#")
    load = Load(bridge.url, {"old": old, "new": new})
    running = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(1.0)
        overlap_written = time.monotonic()
        mount.write(f"{new.secret},{old.secret}")
        new_accepted = await load.until("new", 200)
        load.signing_with = ["old", "new"]
        await asyncio.sleep(1.5)
        removal_written = time.monotonic()
        mount.write(new.secret)
        old_refused = await load.until("old", 401)
        await asyncio.sleep(1.5)
    finally:
        load.stopping.set()
        await running

    statuses = Counter(attempt.status for attempt in load.attempts)
    assert set(statuses) <= {200, 401}, statuses
    assert all(
        a.status == 200 for a in load.attempts if a.signer == "old" and a.answered < removal_written
    )
    assert all(
        a.status == 401 for a in load.attempts if a.signer == "new" and a.answered < overlap_written
    )
    assert all(
        a.status == 200 for a in load.attempts if a.signer == "new" and a.sent > new_accepted
    )
    assert all(a.status == 401 for a in load.attempts if a.signer == "old" and a.sent > old_refused)
    during_overlap = [
        a for a in load.attempts if new_accepted < a.sent and a.answered < removal_written
    ]
    assert {a.signer for a in during_overlap if a.status == 200} == {"old", "new"}
    refused_old = [a for a in load.attempts if a.signer == "old" and a.sent > old_refused]
    assert len(refused_old) >= 10

    accepted = Counter(a.webhook_id for a in load.attempts if a.status == 200)
    in_queue = Counter(message.message_id for message in await broker.drain(queue))
    assert in_queue == accepted, "each 2xx'd webhook once in the queue, nothing else"
    assert len(accepted) >= 100

    assert bridge.process.poll() is None
    assert bridge.process.pid == pid
    assert len(logged(bridge, "listening")) == 1, "no restart"
    assert len(logged(bridge, "webhook secrets reloaded")) == 2
    metrics = await bridge_metrics(bridge)
    assert metric(metrics, "webhook_bridge_secret_reloads_total", result="applied") == 2
    assert metric(metrics, "webhook_bridge_secret_reloads_total", result="refused") == 0
    assert metric(metrics, "webhook_bridge_secret_matches_total", secret_index="1") > 0
    assert bridge.stop() == 0


@pytest.mark.broker
async def test_sighup_reloads_every_worker(
    start_bridge: Callable[..., BridgeProcess], broker: Broker, tmp_path: Path
) -> None:
    old, new = Signer(), Signer()
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    write_secret_file(secrets_dir / SECRET_FILE_NAME, [old.secret])
    bridge = start_bridge(
        BRIDGE_SECRETS_DIR=str(secrets_dir),
        BRIDGE_WEBHOOK_SECRET=None,
        BRIDGE_SECRETS_POLL_INTERVAL="0",
        BRIDGE_WORKERS="2",
    )
    await bridge.wait_ready()
    workers = await listening_workers(bridge, 2)
    queue = await broker.bind_queue(bridge.exchange, "#")

    write_secret_file(secrets_dir / SECRET_FILE_NAME, [new.secret])
    await asyncio.sleep(1.0)
    assert [await post_new_connection(bridge, new) for _ in range(5)][-1][1] == 401, (
        "with polling off, only SIGHUP reloads"
    )
    bridge.process.send_signal(signal.SIGHUP)
    async with asyncio.timeout(10):
        while len(logged(bridge, "webhook secrets reloaded")) < 2:
            await asyncio.sleep(0.05)
    assert {entry["pid"] for entry in logged(bridge, "webhook secrets reloaded")} == workers

    answers = [await post_new_connection(bridge, signer) for signer in [new, old] * 20]
    assert [status for _, status in answers] == [200, 401] * 20
    in_queue = Counter(message.message_id for message in await broker.drain(queue))
    assert in_queue == Counter(webhook_id for webhook_id, status in answers if status == 200)
    assert bridge.process.poll() is None
    assert len(logged(bridge, "listening")) == 2, "the same two workers, not restarted"
    metrics = await bridge_metrics(bridge)
    assert metric(metrics, "webhook_bridge_secret_reloads_total", result="applied") == 2
    assert bridge.stop() == 0


@pytest.mark.broker
async def test_sighup_with_a_fixed_secret_is_logged_and_changes_nothing(
    start_bridge: Callable[..., BridgeProcess], signer: Signer
) -> None:
    bridge = start_bridge()
    await bridge.wait_ready()
    bridge.process.send_signal(signal.SIGHUP)
    async with asyncio.timeout(10):
        while not logged(bridge, "SIGHUP received"):
            await asyncio.sleep(0.05)
    (entry,) = logged(bridge, "SIGHUP received")
    assert "BRIDGE_WEBHOOK_SECRET environment variable" in str(entry["message"])
    assert "cannot change" in str(entry["message"])
    assert await bridge.post_signed(signer, sample_body("batch.failed")) == 200
    assert bridge.process.poll() is None
    assert bridge.stop() == 0


def test_only_secrets_read_from_the_file_can_reload(tmp_path: Path) -> None:
    (tmp_path / "bridge_webhook_secret").write_text(Signer().secret)
    from_file = locate_secret_source(tmp_path, {"PATH": "/bin"})
    assert from_file.path == tmp_path / "bridge_webhook_secret"
    from_environment = locate_secret_source(tmp_path, {"BRIDGE_WEBHOOK_SECRET": "x"})
    assert from_environment.path is None
    assert "environment variable" in from_environment.description
    named = tmp_path / "named"
    from_flag = locate_secret_source(tmp_path, {"BRIDGE_WEBHOOK_SECRET": "x"}, flag_file=str(named))
    assert from_flag.path == named
    assert "--webhook-secret-file" in from_flag.description
    from_standard_input = locate_secret_source(tmp_path, {}, flag_file="-")
    assert from_standard_input.path is None
    assert "standard input" in from_standard_input.description
