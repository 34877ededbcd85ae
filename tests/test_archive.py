"""The archive stream against the real broker: what it holds, and that the alternate
exchange still works with it on; reading it back with ``consume --since`` and ``replay``."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from bridge.app import WEBHOOK_PATH, create_app
from bridge.archive import STREAM_OFFSET_HEADER, ArchiveFollower, history, open_archive
from bridge.publisher import QUARANTINE_REASON_HEADER, Topology
from bridge.replay import (
    REPLAYED_FROM_HEADER,
    Filters,
    ReplayOptions,
    Target,
    replay,
)
from bridge.samples import sample_body
from bridge.settings import Settings, SettingsError
from tests.conftest import (
    AMQP_URL,
    AiohttpClient,
    BridgeProcess,
    Broker,
    Client,
    Signer,
    bridge_environment,
    make_settings,
)
from tests.test_deploy import ImportedDefinitions, _import_definitions, _rabbitmqctl
from tests.test_integration import wait_until_ready
from tests.test_replay import assert_same_event, ids, wait_for_count

pytestmark = pytest.mark.broker

DEFINITIONS = Path(__file__).resolve().parent.parent / "deploy" / "rabbitmq" / "definitions.json"


@pytest.fixture
def settings(signer: Signer) -> Settings:
    return make_settings(signer, archive_max_age="1h")


@pytest.fixture
async def bridge(aiohttp_client: AiohttpClient, settings: Settings, broker: Broker) -> Client:
    broker.forget_topology(Topology.from_settings(settings))
    client = await aiohttp_client(create_app(settings))
    await wait_until_ready(client)
    return client


async def post(client: Client, signer: Signer, body: bytes) -> dict[str, str]:
    headers = signer.headers(body)
    response = await client.post(WEBHOOK_PATH, data=body, headers=headers)
    assert response.status == 200, await response.text()
    return headers


async def archived(settings: Settings) -> list[AbstractIncomingMessage]:
    """Everything in the archive stream now."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        stream = Topology.from_settings(settings).archive_stream
        async with open_archive(connection, stream, start="first", broker_timeout=5) as reader:
            return [message async for message in history(reader, stall_timeout=5)]


async def test_unrouted_events_still_reach_the_unrouted_queue_with_the_archive_on(
    bridge: Client, broker: Broker, settings: Settings, signer: Signer
) -> None:
    topology = Topology.from_settings(settings)
    billing = await broker.bind_queue(settings.exchange, "batch.*")
    bound_body = sample_body("batch.completed")
    bound = await post(bridge, signer, bound_body)
    unbound_body = sample_body("response.completed")
    unbound = await post(bridge, signer, unbound_body)
    broken = await post(bridge, signer, b"[1, 2")

    (routed,) = await broker.drain(billing)
    assert_same_event(routed, bound, bound_body)
    # Bound to BRIDGE_EXCHANGE as before; a delivery names the exchange it was published to.
    assert routed.exchange == topology.ingress_exchange
    await wait_for_count(broker, topology.unrouted_exchange, 1)
    (unrouted,) = await broker.drain(topology.unrouted_exchange)
    assert_same_event(unrouted, unbound, unbound_body)
    (quarantined,) = await broker.drain(topology.quarantine_exchange)
    assert quarantined.message_id == broken["webhook-id"]

    # The archive holds every accepted event, once: published, unrouted and quarantined.
    stored = await archived(settings)
    assert ids(stored) == Counter(h["webhook-id"] for h in (bound, unbound, broken))
    by_id = {message.message_id: message for message in stored}
    assert_same_event(by_id[bound["webhook-id"]], bound, bound_body)
    assert by_id[unbound["webhook-id"]].routing_key == "response.completed"
    assert QUARANTINE_REASON_HEADER in by_id[broken["webhook-id"]].headers


async def test_replay_from_the_archive_into_one_queue(
    bridge: Client, broker: Broker, settings: Settings, signer: Signer
) -> None:
    everyone = await broker.bind_queue(settings.exchange, "#")
    sent = [await post(bridge, signer, sample_body("batch.completed")) for _ in range(3)]
    await post(bridge, signer, sample_body("response.failed"))
    await post(bridge, signer, b"{")  # quarantined: malformed, not replayed anywhere
    await wait_for_count(broker, everyone, 4)
    await broker.drain(everyone)
    newcomer = await broker.bind_queue(settings.exchange)  # bound to nothing: fed by replay

    options = ReplayOptions(
        "archive",
        filters=Filters(types=("batch.*",), since=datetime.now(UTC) - timedelta(minutes=5)),
        target=Target(queue=newcomer),
    )
    summary = await replay(settings, options)

    assert (summary.replayed, summary.filtered, summary.malformed) == (3, 2, 0)
    copies = await broker.drain(newcomer)
    assert ids(copies) == Counter(h["webhook-id"] for h in sent)
    for copy in copies:
        assert copy.headers[REPLAYED_FROM_HEADER] == f"{settings.exchange}.archive"
        assert STREAM_OFFSET_HEADER not in copy.headers
    assert await broker.drain(everyone) == []  # no existing consumer got a second copy
    assert len(await archived(settings)) == 5  # a stream keeps everything

    summary = await replay(settings, ReplayOptions("archive", target=Target(queue=newcomer)))
    assert (summary.replayed, summary.malformed) == (4, 1)
    assert len(await broker.drain(newcomer)) == 4

    later = Filters(since=datetime.now(UTC) + timedelta(hours=1))  # past the stream's end
    options = ReplayOptions("archive", filters=later, target=Target(queue=newcomer))
    summary = await replay(settings, options)
    assert (summary.replayed, summary.error) == (0, None)


def consume_process(settings: Settings, signer: Signer, *arguments: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bridge", "consume", *arguments],
        env=bridge_environment(signer, settings.exchange, 0),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_consume_since_prints_archived_events_then_follows_live_ones(
    bridge: Client, settings: Settings, signer: Signer
) -> None:
    old = [sample_body("batch.completed") for _ in range(2)]
    for body in old:
        await post(bridge, signer, body)
    await post(bridge, signer, sample_body("response.completed"))  # not matched
    await post(bridge, signer, b"oops")  # quarantined: never printed

    reader = consume_process(settings, signer, "batch.*", "--since", "1h", "--count", "3")
    try:
        await asyncio.sleep(4)  # the history is printed, then it waits for live events
        assert reader.poll() is None
        live = sample_body("batch.failed")
        await post(bridge, signer, live)
        out, err = await asyncio.to_thread(reader.communicate, timeout=30)
    finally:
        if reader.poll() is None:
            reader.kill()
    assert reader.returncode == 0, err
    assert out.splitlines() == [body.decode() for body in [*old, live]]


async def test_consume_until_ends_by_itself(
    bridge: Client, settings: Settings, signer: Signer
) -> None:
    now = int(time.time())
    early = sample_body("batch.completed", overrides={"created_at": str(now - 600)})
    late = sample_body("batch.completed", overrides={"created_at": str(now + 3600)})
    await post(bridge, signer, early)
    await post(bridge, signer, late)
    until = datetime.now(UTC).isoformat()

    reader = consume_process(settings, signer, "#", "--since", "1h", "--until", until)
    out, err = await asyncio.to_thread(reader.communicate, timeout=30)
    assert reader.returncode == 0, err
    assert out.splitlines() == [early.decode()]


async def test_consume_since_without_an_archive_says_so(
    broker: Broker, signer: Signer, aiohttp_client: AiohttpClient
) -> None:
    plain = make_settings(signer)
    broker.forget_topology(Topology.from_settings(plain))
    client = await aiohttp_client(create_app(plain))
    await wait_until_ready(client)
    reader = consume_process(plain, signer, "#", "--since", "1h", "--count", "1")
    _, err = await asyncio.to_thread(reader.communicate, timeout=30)
    assert reader.returncode == 1
    assert "BRIDGE_ARCHIVE_MAX_AGE" in err


@pytest.mark.parametrize(
    ("overrides", "enabled"),
    [
        ({}, False),
        ({"archive_max_age": "7D"}, True),
        ({"archive_max_bytes": "20000000000"}, True),
        ({"archive_max_age": "", "archive_max_bytes": ""}, False),
    ],
)
def test_archive_settings(signer: Signer, overrides: dict[str, str], enabled: bool) -> None:
    topology = Topology.from_settings(make_settings(signer, **overrides))
    assert (topology.archive is not None) is enabled
    assert topology.entry_exchange == (topology.ingress_exchange if enabled else topology.exchange)


@pytest.mark.parametrize(
    "overrides",
    [{"archive_max_age": "7d"}, {"archive_max_age": "0D"}, {"archive_max_bytes": "0"}],
)
def test_bad_archive_settings_stop_the_bridge(signer: Signer, overrides: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="BRIDGE_ARCHIVE_MAX"):
        make_settings(signer, **overrides)


def test_definitions_declare_the_archive_behind_a_fanout_ingress() -> None:
    definitions = json.loads(DEFINITIONS.read_text())
    exchanges = {item["name"]: item for item in definitions["exchanges"]}
    queues = {item["name"]: item for item in definitions["queues"]}
    bindings = {
        (b["source"], b["destination"], b["destination_type"]) for b in definitions["bindings"]
    }
    assert exchanges["openai.webhooks.ingress"]["type"] == "fanout"
    assert exchanges["openai.webhooks"]["arguments"] == {
        "alternate-exchange": "openai.webhooks.unrouted"
    }
    archive = queues["openai.webhooks.archive"]
    assert archive["durable"] is True
    assert archive["arguments"]["x-queue-type"] == "stream"
    assert archive["arguments"]["x-max-age"] == "7D"
    assert bindings >= {
        ("openai.webhooks.ingress", "openai.webhooks", "exchange"),
        ("openai.webhooks.ingress", "openai.webhooks.archive", "queue"),
        ("openai.webhooks.quarantine", "openai.webhooks.archive", "queue"),
    }
    # Nothing binds the stream to the topic exchange: that would defeat the alternate exchange.
    assert ("openai.webhooks", "openai.webhooks.archive", "queue") not in bindings


def test_the_bridge_user_may_publish_to_the_ingress_but_not_into_the_archive() -> None:
    definitions = json.loads(DEFINITIONS.read_text())
    (bridge,) = [p for p in definitions["permissions"] if p["user"] == "webhook-bridge"]
    write = re.compile(bridge["write"])  # RabbitMQ searches with the regex, unanchored
    assert write.search("openai.webhooks.ingress")
    for name in ("openai.webhooks.archive", "amq.default", "openai.webhooks.ingress.x"):
        assert not write.search(name), name
    assert bridge["configure"] == bridge["read"] == "^$"


@pytest.fixture
def imported() -> Iterator[ImportedDefinitions]:
    """definitions.json in a throwaway vhost (see tests/test_deploy.py)."""
    with _import_definitions(set_passwords=True) as definitions:
        yield definitions


async def test_the_definitions_archive_with_the_least_privilege_user(
    imported: ImportedDefinitions,
    start_bridge: Callable[..., BridgeProcess],
    signer: Signer,
) -> None:
    """definitions.json's ingress and stream, the bridge only checking them: the archive
    gets both events and the unrouted one still reaches the unrouted queue."""
    bridge = start_bridge(
        exchange="openai.webhooks",
        BRIDGE_AMQP_URL=imported.amqp_url,
        BRIDGE_DECLARE_TOPOLOGY="false",
        BRIDGE_ARCHIVE_MAX_AGE="7D",
    )
    await bridge.wait_ready()
    # No queue of the definitions binds eval.run.*: it waits in the unrouted queue.
    batch, unbound = sample_body("batch.completed"), sample_body("eval.run.succeeded")
    for body in (batch, unbound):
        assert await bridge.post_signed(signer, body) == 200

    vhost = imported.vhost
    await asyncio.to_thread(_rabbitmqctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    inspector = await aio_pika.connect(AMQP_URL.rstrip("/") + "/" + quote(vhost, safe=""))
    async with inspector:
        channel = await inspector.channel()
        billing = await channel.get_queue("billing.batch-outcomes", ensure=False)
        unrouted = await channel.get_queue("openai.webhooks.unrouted", ensure=False)
        assert (await billing.get(no_ack=True, timeout=10)).body == batch
        assert (await unrouted.get(no_ack=True, timeout=10)).body == unbound
        async with open_archive(
            inspector, "openai.webhooks.archive", start="first", broker_timeout=10
        ) as reader:
            stored = [message.body async for message in history(reader, stall_timeout=10)]
    assert stored == [batch, unbound]


async def test_an_archive_with_other_retention_stops_the_bridge(
    broker: Broker, start_bridge: Callable[..., BridgeProcess]
) -> None:
    exchange = f"test.webhooks.{uuid.uuid4().hex[:12]}"
    stream = f"{exchange}.archive"
    await broker.channel.declare_queue(
        stream, durable=True, arguments={"x-queue-type": "stream", "x-max-age": "7D"}
    )
    bridge = start_bridge(exchange=exchange, BRIDGE_ARCHIVE_MAX_AGE="1h")
    status = await asyncio.to_thread(bridge.process.wait, 30)
    assert status != 0
    log = bridge.log_path.read_text()
    assert "archive stream" in log
    assert "policy" in log


async def test_following_the_archive_with_verification_drops_forgeries(
    bridge: Client, broker: Broker, settings: Settings, signer: Signer
) -> None:
    genuine = [sample_body("batch.completed") for _ in range(2)]
    await post(bridge, signer, genuine[0])
    forged_body = sample_body("batch.completed")
    forged = Signer().headers(forged_body)  # anyone who may publish could write this
    async with broker.connection.channel(publisher_confirms=True) as channel:
        await channel.default_exchange.publish(
            aio_pika.Message(
                forged_body,
                headers={name: forged[name] for name in forged if name.startswith("webhook-")},
                message_id=forged["webhook-id"],
                timestamp=datetime.now(UTC),
            ),
            routing_key=Topology.from_settings(settings).archive_stream,
        )
    await post(bridge, signer, genuine[1])

    follower = ArchiveFollower(
        AMQP_URL,
        exchange=settings.exchange,
        patterns=["batch.*"],
        since=datetime.now(UTC) - timedelta(minutes=1),
        until=datetime.now(UTC) + timedelta(seconds=1),
        verify_secrets=[signer.secret],
    )
    async with asyncio.timeout(30), follower:
        bodies = [delivery.body async for delivery in follower]
    assert bodies == genuine
