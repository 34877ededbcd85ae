"""The whole path against the real RabbitMQ: what reaches the queues, byte for byte."""

from __future__ import annotations

import asyncio
import json
import time

import aio_pika
import pytest

from bridge.app import WEBHOOK_PATH, create_app
from bridge.publisher import QUARANTINE_REASON_HEADER, VALIDATED_HEADER, Topology
from bridge.samples import sample_body
from bridge.settings import Settings
from bridge.signature import SignatureVerifier, WebhookHeaders, decode_secret
from tests.conftest import AiohttpClient, Broker, Client, Signer, make_settings, unique_name

pytestmark = pytest.mark.broker


async def wait_until_ready(client: Client, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (await client.get("/readyz")).status != 200:
        if time.monotonic() > deadline:
            raise AssertionError("bridge did not become ready")
        await asyncio.sleep(0.05)


async def ready_client(aiohttp_client: AiohttpClient, settings: Settings) -> Client:
    client = await aiohttp_client(create_app(settings))
    await wait_until_ready(client)
    return client


@pytest.fixture
async def bridge(
    aiohttp_client: AiohttpClient, settings: Settings, broker_topology: Topology
) -> Client:
    return await ready_client(aiohttp_client, settings)


async def test_known_event_reaches_a_bound_queue_with_exact_bytes_and_properties(
    bridge: Client, broker: Broker, settings: Settings, signer: Signer
) -> None:
    queue = await broker.bind_queue(settings.exchange, "batch.*")
    body = sample_body("batch.completed").replace(b",", b", ")
    headers = signer.headers(body)
    response = await bridge.post(WEBHOOK_PATH, data=body, headers=headers)
    assert response.status == 200

    message = await broker.get(queue)
    assert message.body == body
    assert message.routing_key == "batch.completed"
    assert message.exchange == settings.exchange
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == headers["webhook-id"]
    assert message.type == "batch.completed"
    created_at = json.loads(body)["created_at"]
    assert message.timestamp is not None
    assert int(message.timestamp.timestamp()) == created_at
    assert message.headers["webhook-id"] == headers["webhook-id"]
    assert message.headers["webhook-timestamp"] == headers["webhook-timestamp"]
    assert message.headers["webhook-signature"] == headers["webhook-signature"]
    assert message.headers[VALIDATED_HEADER] is True

    reverified = SignatureVerifier(
        [decode_secret(signer.secret)], clock=lambda: float(headers["webhook-timestamp"])
    ).verify(
        WebhookHeaders(
            str(message.headers["webhook-id"]),
            str(message.headers["webhook-timestamp"]),
            str(message.headers["webhook-signature"]),
        ),
        message.body,
    )
    assert reverified == 0


async def test_unknown_type_is_routed_by_type_and_flagged_not_validated(
    bridge: Client, broker: Broker, settings: Settings, signer: Signer
) -> None:
    queue = await broker.bind_queue(settings.exchange, "video.#")
    body = b'{"id":"evt_9","created_at":1760000000,"type":"video.completed","data":{"x":1}}'
    assert (await bridge.post(WEBHOOK_PATH, data=body, headers=signer.headers(body))).status == 200
    message = await broker.get(queue)
    assert message.body == body
    assert message.routing_key == "video.completed"
    assert message.headers[VALIDATED_HEADER] is False


async def test_malformed_authentic_event_goes_to_quarantine_only(
    bridge: Client, broker: Broker, settings: Settings, signer: Signer
) -> None:
    everything = await broker.bind_queue(settings.exchange, "#")
    body = b'{"id":"evt_1","created_at":1,"type":"batch.completed","data":{"no_id":true}}'
    response = await bridge.post(WEBHOOK_PATH, data=body, headers=signer.headers(body))
    assert response.status == 200
    assert await response.json() == {"outcome": "quarantined"}
    message = await broker.get(settings.quarantine_exchange)
    assert message.body == body
    assert "batch.completed" in str(message.headers[QUARANTINE_REASON_HEADER])
    assert await broker.drain(everything) == []
    assert await broker.drain(settings.unrouted_exchange) == []


async def test_event_nobody_bound_is_kept_in_the_unrouted_queue(
    bridge: Client, broker: Broker, settings: Settings, signer: Signer
) -> None:
    body = sample_body("response.incomplete")
    response = await bridge.post(WEBHOOK_PATH, data=body, headers=signer.headers(body))
    assert response.status == 200
    message = await broker.get(settings.unrouted_exchange)
    assert message.body == body
    assert message.routing_key == "response.incomplete"


async def test_binding_patterns_match_words_as_documented(
    bridge: Client, broker: Broker, settings: Settings, signer: Signer
) -> None:
    one_word = await broker.bind_queue(settings.exchange, "*.failed")
    any_words = await broker.bind_queue(settings.exchange, "#.failed")
    for event_type in ("batch.failed", "eval.run.failed", "fine_tuning.job.succeeded"):
        body = sample_body(event_type)
        assert (await bridge.post(WEBHOOK_PATH, data=body, headers=signer.headers(body))).ok
    assert [m.routing_key for m in await broker.drain(one_word)] == ["batch.failed"]
    assert [m.routing_key for m in await broker.drain(any_words)] == [
        "batch.failed",
        "eval.run.failed",
    ]


async def test_rejected_requests_publish_nothing(
    bridge: Client, broker: Broker, settings: Settings, signer: Signer
) -> None:
    everything = await broker.bind_queue(settings.exchange, "#")
    body = sample_body("batch.completed")
    forged = Signer().headers(body)
    assert (await bridge.post(WEBHOOK_PATH, data=body, headers=forged)).status == 401
    assert (await bridge.post(WEBHOOK_PATH, data=body)).status == 400
    await asyncio.sleep(0.2)
    assert await broker.drain(everything) == []
    assert await broker.drain(settings.unrouted_exchange) == []
    assert await broker.drain(settings.quarantine_exchange) == []


async def test_concurrent_copies_are_published_once(
    bridge: Client, broker: Broker, settings: Settings, signer: Signer
) -> None:
    queue = await broker.bind_queue(settings.exchange, "#")
    body = sample_body("realtime.call.incoming")
    headers = signer.headers(body)
    responses = await asyncio.gather(
        *(bridge.post(WEBHOOK_PATH, data=body, headers=headers) for _ in range(30))
    )
    assert {response.status for response in responses} == {200}
    await asyncio.sleep(0.3)
    assert [m.body for m in await broker.drain(queue)] == [body]


async def test_broker_unreachable_answers_503_quickly(
    aiohttp_client: AiohttpClient, signer: Signer
) -> None:
    settings = make_settings(signer, amqp_url="amqp://guest:guest@127.0.0.1:1/")
    client = await aiohttp_client(create_app(settings))
    body = sample_body("batch.completed")
    started = time.monotonic()
    response = await client.post(WEBHOOK_PATH, data=body, headers=signer.headers(body))
    assert response.status == 503
    assert response.headers["Retry-After"]
    assert time.monotonic() - started < 1.0
    assert (await client.get("/readyz")).status == 503
    assert (await client.get("/healthz")).status == 200


async def test_operator_managed_topology_is_checked_not_declared(
    aiohttp_client: AiohttpClient, broker: Broker, signer: Signer
) -> None:
    settings = make_settings(signer, declare_topology=False)
    topology = Topology.from_settings(settings)
    broker.forget_topology(topology)
    client = await aiohttp_client(create_app(settings))
    await asyncio.sleep(1.0)
    assert (await client.get("/readyz")).status == 503

    # The operator creates the exchanges, but forgets the alternate-exchange link.
    await broker.channel.declare_exchange(settings.exchange, "topic", durable=True)
    for name in (topology.unrouted_exchange, topology.quarantine_exchange):
        exchange = await broker.channel.declare_exchange(name, "fanout", durable=True)
        queue = await broker.channel.declare_queue(name, durable=True)
        await queue.bind(exchange)
    await wait_until_ready(client)

    body = sample_body("batch.expired")
    response = await client.post(WEBHOOK_PATH, data=body, headers=signer.headers(body))
    assert await response.json() == {"outcome": "unrouted"}
    message = await broker.get(topology.unrouted_exchange)
    assert message.body == body


async def test_bridge_does_not_create_a_missing_exchange_when_told_not_to(
    aiohttp_client: AiohttpClient, broker: Broker, signer: Signer
) -> None:
    settings = make_settings(signer, declare_topology=False, exchange=unique_name("missing"))
    await aiohttp_client(create_app(settings))
    await asyncio.sleep(0.5)
    with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
        async with broker.connection.channel() as channel:
            await channel.declare_exchange(settings.exchange, passive=True)


async def test_requests_beyond_the_in_flight_limit_wait_their_turn(
    aiohttp_client: AiohttpClient, broker: Broker, signer: Signer
) -> None:
    settings = make_settings(signer, max_publishes_in_flight=1, min_publishes_in_flight=1)
    broker.forget_topology(Topology.from_settings(settings))
    client = await ready_client(aiohttp_client, settings)
    queue = await broker.bind_queue(settings.exchange, "#")
    bodies = [sample_body("response.failed") for _ in range(20)]
    responses = await asyncio.gather(
        *(client.post(WEBHOOK_PATH, data=body, headers=signer.headers(body)) for body in bodies)
    )
    assert [response.status for response in responses] == [200] * 20
    assert sorted(message.body for message in await broker.drain(queue)) == sorted(bodies)
