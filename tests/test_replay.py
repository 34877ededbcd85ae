"""``replay`` against the real broker: what reaches the target queue, and what stays behind.

Events reach their source the way production puts them there (through the bridge, a
consumer's dead-lettering) or, where the test needs a stored message the current
bridge would not produce (an event quarantined by an older model), by publishing the
stored form directly. Every assertion is on queue contents: count per ``webhook-id``,
exact bytes, headers and properties.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client.parser import text_string_to_metric_families

from bridge.app import WEBHOOK_PATH, create_app
from bridge.cli.replay import replay_and_report
from bridge.consumer import EventConsumer
from bridge.publisher import (
    QUARANTINE_REASON_HEADER,
    VALIDATED_HEADER,
    Topology,
    declare_topology,
)
from bridge.replay import (
    REPLAYED_AT_HEADER,
    REPLAYED_FROM_HEADER,
    Filters,
    ReplayError,
    ReplayOptions,
    ReplaySummary,
    Target,
    replay,
)
from bridge.samples import sample_body
from bridge.settings import Settings
from tests.conftest import (
    AMQP_URL,
    AiohttpClient,
    Broker,
    Client,
    Signer,
    bridge_environment,
    free_port,
    make_settings,
    new_secret,
)
from tests.test_integration import wait_until_ready

pytestmark = pytest.mark.broker

Post = Callable[[bytes], Awaitable[dict[str, str]]]


@pytest.fixture
async def post(
    aiohttp_client: AiohttpClient, settings: Settings, broker: Broker, signer: Signer
) -> Post:
    """POST signed webhooks to an in-process bridge on ``settings``; the headers sent."""
    broker.forget_topology(Topology.from_settings(settings))
    client = await aiohttp_client(create_app(settings))
    await wait_until_ready(client)
    return _poster(client, signer)


def _poster(client: Client, signer: Signer) -> Post:
    async def post(body: bytes) -> dict[str, str]:
        headers = signer.headers(body)
        response = await client.post(WEBHOOK_PATH, data=body, headers=headers)
        assert response.status == 200, await response.text()
        return headers

    return post


async def wait_for_count(broker: Broker, queue: str, expected: int, timeout: float = 10) -> None:
    """Until ``queue`` holds ``expected`` ready messages (quorum queues count asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        async with broker.connection.channel() as channel:
            declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        if count == expected:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{queue} holds {count} messages, expected {expected}")
        await asyncio.sleep(0.05)


def ids(messages: list[AbstractIncomingMessage]) -> Counter[str]:
    return Counter(str(message.message_id) for message in messages)


def assert_same_event(copy: AbstractIncomingMessage, headers: dict[str, str], body: bytes) -> None:
    """The copy is the stored event, byte for byte, with its webhook headers."""
    assert copy.body == body
    assert copy.message_id == headers["webhook-id"]
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        assert copy.headers[name] == headers[name], name
    assert copy.content_type == "application/json"
    assert copy.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert copy.app_id == "openai-webhook-bridge"
    event = json.loads(body)
    assert copy.type == event["type"]
    assert copy.timestamp is not None
    assert int(copy.timestamp.timestamp()) == event["created_at"]


def assert_replay_marks(copy: AbstractIncomingMessage, source: str) -> None:
    assert copy.headers[REPLAYED_FROM_HEADER] == source
    replayed_at = datetime.fromisoformat(str(copy.headers[REPLAYED_AT_HEADER]))
    assert abs(datetime.now(UTC) - replayed_at) < timedelta(minutes=1)


async def test_replaying_unrouted_after_a_consumer_binds(
    post: Post, broker: Broker, settings: Settings
) -> None:
    topology = Topology.from_settings(settings)
    batches = [sample_body("batch.completed") for _ in range(3)]
    sent = [await post(body) for body in batches]
    unbound = sample_body("response.completed")
    unbound_headers = await post(unbound)
    await wait_for_count(broker, topology.unrouted_exchange, 4)

    billing = await broker.bind_queue(settings.exchange, "batch.*")
    summary = await replay(settings, ReplayOptions("unrouted"))

    assert (summary.replayed, summary.left, summary.unrouted) == (3, 1, 1)
    assert (summary.malformed, summary.unverifiable, summary.filtered) == (0, 0, 0)
    assert summary.error is None
    assert "1 back in" in summary.line()
    copies = await broker.drain(billing)
    assert ids(copies) == Counter(headers["webhook-id"] for headers in sent)
    by_id = {copy.message_id: copy for copy in copies}
    for headers, body in zip(sent, batches, strict=True):
        copy = by_id[headers["webhook-id"]]
        assert_same_event(copy, headers, body)
        assert_replay_marks(copy, topology.unrouted_exchange)
        assert copy.headers[VALIDATED_HEADER] is True
        assert copy.routing_key == "batch.completed"
    # Nothing binds response.*: it is back in unrouted, once, and a second pass ends too.
    left = await broker.drain(topology.unrouted_exchange)
    assert ids(left) == Counter([unbound_headers["webhook-id"]])
    assert_same_event(left[0], unbound_headers, unbound)
    assert_replay_marks(left[0], topology.unrouted_exchange)


async def test_a_second_pass_over_what_came_back_ends(
    post: Post, broker: Broker, settings: Settings
) -> None:
    topology = Topology.from_settings(settings)
    sent = [await post(sample_body("response.completed")) for _ in range(3)]
    await wait_for_count(broker, topology.unrouted_exchange, 3)
    for _ in range(2):
        summary = await asyncio.wait_for(replay(settings, ReplayOptions("unrouted")), 30)
        assert (summary.replayed, summary.left, summary.unrouted) == (0, 3, 3)
    left = await broker.drain(topology.unrouted_exchange)
    assert ids(left) == Counter(headers["webhook-id"] for headers in sent)


async def test_dry_run_changes_nothing(post: Post, broker: Broker, settings: Settings) -> None:
    topology = Topology.from_settings(settings)
    sent = [await post(sample_body("batch.failed")) for _ in range(3)]
    await wait_for_count(broker, topology.unrouted_exchange, 3)
    billing = await broker.bind_queue(settings.exchange, "#")

    summary = await replay(settings, ReplayOptions("unrouted", dry_run=True))

    assert (summary.replayed, summary.left, summary.dry_run) == (3, 0, True)
    assert "would replay 3" in summary.line()
    assert await broker.drain(billing) == []
    left = await broker.drain(topology.unrouted_exchange)
    assert ids(left) == Counter(headers["webhook-id"] for headers in sent)
    assert all(REPLAYED_FROM_HEADER not in message.headers for message in left)


async def test_type_and_time_filters_leave_the_rest_in_place(
    post: Post, broker: Broker, settings: Settings
) -> None:
    topology = Topology.from_settings(settings)
    now = int(time.time())
    old_batch = await post(
        sample_body("batch.completed", overrides={"created_at": str(now - 7200)})
    )
    new_batch = await post(sample_body("batch.failed"))
    other = await post(sample_body("response.completed"))
    await wait_for_count(broker, topology.unrouted_exchange, 3)
    everything = await broker.bind_queue(settings.exchange, "#")

    filters = Filters(types=("batch.*",), since=datetime.now(UTC) - timedelta(hours=1))
    summary = await replay(settings, ReplayOptions("unrouted", filters=filters))

    assert (summary.replayed, summary.filtered, summary.left) == (1, 2, 0)
    assert ids(await broker.drain(everything)) == Counter([new_batch["webhook-id"]])
    left = await broker.drain(topology.unrouted_exchange)
    assert ids(left) == Counter([old_batch["webhook-id"], other["webhook-id"]])


async def test_limit_and_rate(post: Post, broker: Broker, settings: Settings) -> None:
    topology = Topology.from_settings(settings)
    for _ in range(5):
        await post(sample_body("batch.completed"))
    await wait_for_count(broker, topology.unrouted_exchange, 5)
    billing = await broker.bind_queue(settings.exchange, "batch.*")

    started = time.monotonic()
    summary = await replay(settings, ReplayOptions("unrouted", limit=3, rate=10))
    elapsed = time.monotonic() - started

    assert (summary.replayed, summary.left) == (3, 2)
    assert elapsed >= 0.2  # three publishes at 10/s: two intervals of 0.1 s at least
    assert len(await broker.drain(billing)) == 3
    await wait_for_count(broker, topology.unrouted_exchange, 2)


async def test_failed_reverification_stays_in_the_source(
    post: Post, broker: Broker, settings: Settings, signer: Signer
) -> None:
    topology = Topology.from_settings(settings)
    sent = [await post(sample_body("batch.completed")) for _ in range(2)]
    forged_body = sample_body("batch.completed")
    forged = Signer().headers(forged_body)  # signed with a secret the bridge never had
    async with broker.connection.channel() as channel:
        await channel.default_exchange.publish(
            aio_pika.Message(forged_body, headers=dict(forged), message_id=forged["webhook-id"]),
            routing_key=topology.unrouted_exchange,
        )
    await wait_for_count(broker, topology.unrouted_exchange, 3)
    billing = await broker.bind_queue(settings.exchange, "batch.*")

    # The secret was rotated since: the stored events no longer verify...
    rotated = make_settings(Signer(new_secret()), exchange=settings.exchange)
    summary = await replay(rotated, ReplayOptions("unrouted"))
    assert (summary.replayed, summary.unverifiable) == (0, 3)
    assert await broker.drain(billing) == []
    await wait_for_count(broker, topology.unrouted_exchange, 3)

    # ...until the retired secret is given for this run; the forgery never verifies.
    summary = await replay(rotated, ReplayOptions("unrouted", extra_secrets=(signer.secret,)))
    assert (summary.replayed, summary.unverifiable) == (2, 1)
    assert ids(await broker.drain(billing)) == Counter(h["webhook-id"] for h in sent)
    left = await broker.drain(topology.unrouted_exchange)
    assert ids(left) == Counter([forged["webhook-id"]])
    assert REPLAYED_FROM_HEADER not in left[0].headers


async def store_as_quarantined(
    broker: Broker, topology: Topology, signer: Signer, body: bytes, reason: str
) -> dict[str, str]:
    """What an older bridge put in the quarantine for ``body`` (signed, with its reason)."""
    headers = signer.headers(body)
    stored = {name: headers[name] for name in ("webhook-id", "webhook-timestamp")}
    stored["webhook-signature"] = headers["webhook-signature"]
    async with broker.connection.channel(publisher_confirms=True) as channel:
        await channel.default_exchange.publish(
            aio_pika.Message(
                body,
                headers={**stored, QUARANTINE_REASON_HEADER: reason},
                message_id=headers["webhook-id"],
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                timestamp=datetime.now(UTC),
                app_id="openai-webhook-bridge",
            ),
            routing_key=topology.quarantine_exchange,
        )
    return headers


async def test_quarantine_fixed_events_go_out_still_malformed_stay(
    post: Post, broker: Broker, settings: Settings, signer: Signer
) -> None:
    topology = Topology.from_settings(settings)
    broken = b'{"type": "batch.completed", "data": '
    broken_headers = await post(broken)  # the bridge quarantines it
    # A known type an older model rejected: the current model accepts it.
    fixed_body = sample_body("batch.completed")
    fixed = await store_as_quarantined(broker, topology, signer, fixed_body, "data.id: missing")
    await wait_for_count(broker, topology.quarantine_exchange, 2)
    billing = await broker.bind_queue(settings.exchange, "batch.*")

    summary = await replay(settings, ReplayOptions("quarantine"))

    assert (summary.replayed, summary.malformed) == (1, 1)
    (copy,) = await broker.drain(billing)
    assert copy.body == fixed_body
    assert copy.message_id == fixed["webhook-id"]
    assert copy.headers["webhook-signature"] == fixed["webhook-signature"]
    assert copy.headers[VALIDATED_HEADER] is True
    assert QUARANTINE_REASON_HEADER not in copy.headers
    assert_replay_marks(copy, topology.quarantine_exchange)
    (still,) = await broker.drain(topology.quarantine_exchange)
    assert still.body == broken
    assert still.message_id == broken_headers["webhook-id"]
    assert REPLAYED_FROM_HEADER not in still.headers  # left exactly as it was


async def test_dead_letter_back_to_the_consumer_queue(
    post: Post, broker: Broker, settings: Settings
) -> None:
    dead_letter = f"{settings.exchange}.dead-letter"
    billing = f"{settings.exchange}.billing"
    broker.created_queues += [billing, dead_letter]
    broker.created_exchanges.append(dead_letter)
    consumer = EventConsumer(
        AMQP_URL,
        exchange=settings.exchange,
        patterns=["batch.*"],
        queue=billing,
        dead_letter_exchange=dead_letter,
    )
    async with consumer:
        body = sample_body("batch.failed")
        headers = await post(body)
        async with asyncio.timeout(10):
            async for delivery in consumer:
                await delivery.reject()  # the handler failed: dead-lettered
                break
    await wait_for_count(broker, dead_letter, 1)

    summary = await replay(settings, ReplayOptions("dead-letter", target=Target(queue=billing)))

    assert (summary.replayed, summary.left) == (1, 0)
    (copy,) = await broker.drain(billing)
    assert_same_event(copy, headers, body)
    assert_replay_marks(copy, dead_letter)
    assert "x-death" in copy.headers  # where it was dead-lettered from, kept for the record
    assert await broker.drain(dead_letter) == []


async def test_a_named_queue_and_a_malformed_event_goes_to_the_quarantine(
    broker: Broker, settings: Settings, signer: Signer
) -> None:
    topology = Topology.from_settings(settings)
    broker.forget_topology(topology)
    async with broker.connection.channel() as channel:
        await declare_topology(channel, topology)
    parked = await broker.bind_queue(settings.exchange)  # a queue an operator filled by hand
    body = b"not json at all"
    headers = signer.headers(body)
    async with broker.connection.channel() as channel:
        await channel.default_exchange.publish(
            aio_pika.Message(body, headers=dict(headers), message_id=headers["webhook-id"]),
            routing_key=parked,
        )
    await wait_for_count(broker, parked, 1)

    summary = await replay(settings, ReplayOptions(parked))

    assert (summary.replayed, summary.malformed, summary.left) == (0, 1, 0)
    assert await broker.drain(parked) == []
    (quarantined,) = await broker.drain(topology.quarantine_exchange)
    assert quarantined.body == body
    assert quarantined.headers[QUARANTINE_REASON_HEADER] == "body is not valid JSON"
    assert_replay_marks(quarantined, parked)


async def test_unknown_source_and_missing_target_are_refused(settings: Settings) -> None:
    with pytest.raises(ReplayError, match=r"source queue .* does not exist"):
        await replay(settings, ReplayOptions(f"{settings.exchange}.nothing-here"))
    with pytest.raises(ReplayError, match="does not exist"):
        await replay(settings, ReplayOptions("unrouted", target=Target(queue="no.such.queue.x")))
    with pytest.raises(ReplayError, match="--to-queue"):
        await replay(settings, ReplayOptions("archive"))


def replay_process(signer: Signer, settings: Settings, *arguments: str) -> subprocess.Popen[str]:
    environment = bridge_environment(signer, settings.exchange, 0)
    return subprocess.Popen(
        [sys.executable, "-m", "bridge", "replay", "--json", *arguments],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_a_replay_killed_halfway_and_run_again_loses_nothing(
    post: Post, broker: Broker, settings: Settings, signer: Signer
) -> None:
    topology = Topology.from_settings(settings)
    sent = [await post(sample_body("batch.completed")) for _ in range(40)]
    await wait_for_count(broker, topology.unrouted_exchange, 40)
    billing = await broker.bind_queue(settings.exchange, "batch.*")

    killed = replay_process(signer, settings, "--from", "unrouted", "--rate", "20")
    deadline = time.monotonic() + 30
    while True:  # until it is visibly halfway
        async with broker.connection.channel() as channel:
            declared = await channel.declare_queue(billing, passive=True)
        if (declared.declaration_result.message_count or 0) >= 10:
            break
        assert time.monotonic() < deadline, "the replay made no progress"
        assert killed.poll() is None, killed.communicate()
        await asyncio.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=10)

    again = replay_process(signer, settings, "--from", "unrouted")
    out, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    summary = json.loads(out)
    assert summary["error"] is None

    delivered = ids(await broker.drain(billing))
    assert set(delivered) == {headers["webhook-id"] for headers in sent}  # nothing lost
    duplicates = sum(count - 1 for count in delivered.values())
    assert duplicates <= 1  # one message at a time is between confirm and ack
    assert await broker.drain(topology.unrouted_exchange) == []


def test_summary_line_names_every_count() -> None:
    summary = ReplaySummary(
        "unrouted", "x.unrouted", "x.unrouted", dry_run=False, replayed=2, unrouted=1, left=1
    )
    line = summary.line()
    assert "replayed 2" in line
    for part in ("still malformed", "not verifiable", "skipped by filter", "left in place"):
        assert part in line
    assert "1 back in x.unrouted" in line
    assert set(summary.as_dict()) >= {
        "replayed",
        "malformed",
        "unverifiable",
        "filtered",
        "left",
        "unrouted",
        "dry_run",
        "error",
    }


def test_cli_rejects_archive_without_a_target(tmp_path: Path) -> None:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
        "BRIDGE_WEBHOOK_SECRET": new_secret(),
        "BRIDGE_AMQP_URL": AMQP_URL,
        "BRIDGE_SECRETS_DIR": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "replay", "--from", "archive"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--to-queue" in result.stderr


def read_url(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        text: str = response.read().decode()
        return text


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    """A real Prometheus Pushgateway on a free loopback port (Debian's package)."""
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    if binary is None:
        pytest.skip("no Pushgateway installed (apt-get install prometheus-pushgateway)")
    port = free_port()
    log = (tmp_path / "pushgateway.log").open("w")
    process = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError):
                read_url(f"{url}/-/ready")
                break
            assert process.poll() is None, "the pushgateway exited"
            assert time.monotonic() < deadline, "the pushgateway did not become ready"
            time.sleep(0.1)
        yield url
    finally:
        process.kill()
        process.wait()
        log.close()


async def test_counts_are_pushed_to_a_pushgateway(
    post: Post, broker: Broker, settings: Settings, pushgateway: str
) -> None:
    topology = Topology.from_settings(settings)
    for _ in range(2):
        await post(sample_body("batch.completed"))
    await post(sample_body("response.completed"))
    await wait_for_count(broker, topology.unrouted_exchange, 3)
    await broker.bind_queue(settings.exchange, "batch.*")

    options = ReplayOptions("unrouted", filters=Filters(types=("batch.*",)))
    status = await replay_and_report(settings, options, json_output=True, pushgateway=pushgateway)

    assert status == 0
    exposition = await asyncio.to_thread(read_url, f"{pushgateway}/metrics")
    pushed = {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(exposition)
        if family.name == "webhook_bridge_replay_messages"
        for sample in family.samples
        if sample.name.endswith("_total")
        and sample.labels.get("source") == "unrouted"
        and sample.labels.get("job") == "webhook-bridge-replay"
    }
    assert pushed == {
        "replayed": 2,
        "malformed": 0,
        "unverifiable": 0,
        "filtered": 1,
        "left": 0,
    }
