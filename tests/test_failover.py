"""Several broker addresses: the order nodes are tried in, and start-up against a list."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import aio_pika
import aiormq
import pytest
from yarl import URL

from bridge.app import create_app
from bridge.consumer import connect_to_a_node
from bridge.events import classify
from bridge.nodes import BrokerNodes, node_address, within
from bridge.publisher import (
    AmqpPublisher,
    BrokerUnavailable,
    Outcome,
    OutgoingMessage,
    _Confirmation,
    route,
)
from bridge.samples import sample_body
from bridge.settings import Settings
from bridge.signature import WebhookHeaders
from tests.conftest import (
    AMQP_URL,
    AiohttpClient,
    BridgeProcess,
    Broker,
    Signer,
    make_settings,
    unique_name,
    until_publisher_ready,
)
from tests.tcp_proxy import holdable_proxy

NODES = [URL(f"amqp://bridge:pw@rabbit-{index}:5672/") for index in range(3)]


def test_each_process_shuffles_the_nodes_once() -> None:
    orders = {tuple(BrokerNodes(NODES, random.Random(seed)).round()) for seed in range(40)}
    assert len(orders) > 1, "processes spread over the nodes"
    for order in orders:
        assert sorted(order, key=str) == NODES


def test_after_losing_a_node_the_next_round_tries_it_last() -> None:
    nodes = BrokerNodes(NODES, random.Random(7))
    first, second, third = nodes.round()
    assert nodes.connected_to(first) is False
    nodes.lost_current()
    assert nodes.round() == [second, third, first]
    assert nodes.connected_to(third) is True, "a connection after the first is a reconnect"
    nodes.lost_current()
    assert nodes.round() == [first, second, third]
    assert nodes.current == node_address(third)


def test_a_node_is_named_by_host_and_port_only() -> None:
    assert node_address(URL("amqp://user:secret@rabbit-0/vhost")) == "rabbit-0:5672"
    assert node_address(URL("amqps://user:secret@rabbit-1:5999/")) == "rabbit-1:5999"
    assert node_address(URL("amqps://rabbit-2/")) == "rabbit-2:5671"


@pytest.mark.broker
async def test_a_dead_node_in_the_list_is_skipped(
    signer: Signer, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    dead = "amqp://guest:dead-node-password@127.0.0.1:1/"
    settings: Settings = make_settings(signer, amqp_url=f"{dead},{AMQP_URL}")
    broker.forget_topology(AmqpPublisher(settings).topology)
    connections: list[tuple[str, bool]] = []
    for seed in range(2):  # once with each node first
        publisher = AmqpPublisher(
            settings,
            on_connect=lambda node, reconnect: connections.append((node, reconnect)),
            rng=random.Random(seed),
        )
        await publisher.start()
        try:
            await until_publisher_ready(publisher, 20)
            assert publisher.node == node_address(URL(AMQP_URL))
        finally:
            await publisher.close()
    assert connections == [(node_address(URL(AMQP_URL)), False)] * 2
    assert "dead-node-password" not in caplog.text


@pytest.mark.broker
async def test_an_owned_queue_of_the_other_type_stops_serve(
    broker: Broker, start_bridge: Callable[..., BridgeProcess]
) -> None:
    exchange = unique_name("test.webhooks")
    classic = await broker.channel.declare_queue(f"{exchange}.quarantine", durable=True)
    broker.created_queues.append(classic.name)
    bridge = start_bridge(exchange)
    assert await asyncio.to_thread(bridge.process.wait, 30) == 2
    log = bridge.log_path.read_text()
    assert f"queue '{exchange}.quarantine' exists as a classic queue" in log
    assert "but BRIDGE_QUEUE_TYPE is quorum" in log
    assert log.count("cannot start") == 1


@pytest.mark.broker
async def test_classic_keeps_classic_queues(
    broker: Broker, start_bridge: Callable[..., BridgeProcess], signer: Signer
) -> None:
    bridge = start_bridge(BRIDGE_QUEUE_TYPE="classic")
    await bridge.wait_ready()
    for name in (f"{bridge.exchange}.unrouted", f"{bridge.exchange}.quarantine"):
        # Declaring with the same type succeeds only if the queue has that type.
        await broker.channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": "classic"}
        )
    assert bridge.stop() == 0


async def test_a_call_cancelled_under_the_caller_is_a_connection_error() -> None:
    async def cancelled_by_the_library() -> None:
        raise asyncio.CancelledError

    with pytest.raises(ConnectionError):
        await within(1.0, cancelled_by_the_library())
    with pytest.raises(TimeoutError):
        await within(0.01, asyncio.sleep(10))


@pytest.mark.broker
async def test_consumers_take_the_first_node_of_the_list_that_answers() -> None:
    dead = "amqp://guest:guest@127.0.0.1:1/"
    connection = await connect_to_a_node(f"{dead}, {AMQP_URL}", aio_pika.connect, attempt_seconds=5)
    async with connection:
        assert connection.url.port == URL(AMQP_URL).port
    with pytest.raises(ConnectionError):
        await connect_to_a_node(dead, aio_pika.connect, attempt_seconds=5)


@pytest.mark.broker
async def test_a_channel_the_broker_closes_fails_its_publishes_at_once(
    signer: Signer, broker: Broker
) -> None:
    settings = make_settings(signer, publish_timeout=10.0)
    publisher = AmqpPublisher(settings)
    broker.forget_topology(publisher.topology)
    body = sample_body("batch.completed")
    headers = WebhookHeaders.from_mapping(signer.headers(body))

    def message(exchange: str) -> OutgoingMessage:
        outgoing = route(publisher.topology, headers, body, classify(body))
        outgoing.exchange = exchange
        return outgoing

    await publisher.start()
    try:
        await until_publisher_ready(publisher, 20)
        queue = await broker.bind_queue(settings.exchange, "#")
        started = asyncio.get_running_loop().time()
        # An exchange that does not exist: the broker closes the channel (404).
        with pytest.raises(BrokerUnavailable):
            await publisher.publish(message(unique_name("test.missing")))
        assert asyncio.get_running_loop().time() - started < 2.0, "failed at the deadline only"
        await until_publisher_ready(publisher, 20)
        assert await publisher.publish(message(settings.exchange)) is Outcome.PUBLISHED
    finally:
        await publisher.close()
    delivered = await broker.drain(queue)
    assert [m.body for m in delivered] == [body]


async def test_an_answer_to_a_confirmation_given_up_is_ignored() -> None:
    # aiormq's reader settles confirmations without asking whether they still wait:
    # a return read just after the deadline must not raise in it (and close the channel).
    confirmation = _Confirmation(loop=asyncio.get_running_loop())
    confirmation.cancel()
    confirmation.set_exception(aiormq.exceptions.ChannelInvalidStateError("returned"))
    confirmation.set_result(None)
    assert confirmation.cancelled()


@pytest.mark.broker
async def test_requests_waiting_for_a_slot_when_the_connection_goes_get_503(
    signer: Signer, broker: Broker, aiohttp_client: AiohttpClient
) -> None:
    """The race a paused node's forced close set off: requests queued for an in-flight slot
    reached the publishing channel after the supervisor had dropped it (a 500 each)."""
    upstream = URL(AMQP_URL)
    async with holdable_proxy(upstream.host or "127.0.0.1", upstream.port or 5672) as proxy:
        settings = make_settings(
            signer,
            amqp_url=str(upstream.with_host("127.0.0.1").with_port(proxy.port)),
            publish_timeout=10.0,
            min_publishes_in_flight=1,
            max_publishes_in_flight=1,
        )
        publisher = AmqpPublisher(settings)
        broker.forget_topology(publisher.topology)
        await publisher.start()
        try:
            await until_publisher_ready(publisher, 20)
            client = await aiohttp_client(create_app(settings, publisher))
            queue = await broker.bind_queue(settings.exchange, "#")
            # The only slot is the test's: every request waits for it, past the ready check.
            assert publisher.in_flight_limit.try_acquire()
            bodies = [sample_body("batch.completed") for _ in range(5)]
            waiting = [
                asyncio.create_task(client.post("/webhooks/openai", data=body, headers=headers))
                for body in bodies
                for headers in [signer.headers(body)]
            ]
            async with asyncio.timeout(5):
                while publisher.in_flight_limit.waiting < len(waiting):
                    await asyncio.sleep(0.01)
            proxy.hold()  # reconnecting hangs until the test lets it through
            proxy.cut()
            async with asyncio.timeout(10):
                # Private on purpose: the moment the supervisor has dropped the channel.
                while publisher._channel is not None:
                    await asyncio.sleep(0.01)
            publisher.in_flight_limit.release(None)
            statuses = [(await asyncio.wait_for(task, 15)).status for task in waiting]
            assert statuses == [503] * len(waiting)

            proxy.resume()
            await until_publisher_ready(publisher, 30)
            body = sample_body("batch.completed")
            response = await client.post(
                "/webhooks/openai", data=body, headers=signer.headers(body)
            )
            assert response.status == 200
        finally:
            await publisher.close()
    assert [message.body for message in await broker.drain(queue)] == [body]
