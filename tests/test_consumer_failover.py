"""The consumer keeps consuming when it loses its node: given a cluster's node list, it
connects to another node, declares and binds again and goes on in the same stream, with
nothing the broker confirmed lost and, with an idempotency store, nothing handled twice.

Two TCP forwarders to the broker under test stand for two nodes of one cluster: cutting
one closes the consumer's connection as a node's death does, holding one freezes it as a
stopped node does. The same on a real three-node cluster: tests/test_cluster_consumer.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from yarl import URL

from bridge.consumer import ConsumerSettings, EventConsumer, InMemoryIdempotencyStore, WebhookEvent
from bridge.events import parse_event
from bridge.nodes import node_address
from bridge.samples import new_webhook_id, sample_body
from bridge.settings import SettingsError
from tests.conftest import AMQP_URL, Broker, Signer, unique_name
from tests.tcp_proxy import HoldableProxy, holdable_proxy
from tests.test_consumer import exchange, publish_like_bridge, wait_until

__all__ = ["exchange"]  # a fixture used by the tests below


@contextlib.asynccontextmanager
async def two_nodes() -> AsyncIterator[tuple[HoldableProxy, HoldableProxy]]:
    """Two ``nodes`` that are the broker under test behind a forwarder each."""
    broker_url = URL(AMQP_URL)
    host, port = broker_url.host or "127.0.0.1", broker_url.port or 5672
    async with holdable_proxy(host, port) as first, holdable_proxy(host, port) as second:
        yield first, second


def node_urls(*proxies: HoldableProxy) -> str:
    broker_url = URL(AMQP_URL)
    return ",".join(str(broker_url.with_host("127.0.0.1").with_port(p.port)) for p in proxies)


def proxy_of(consumer: EventConsumer, proxies: tuple[HoldableProxy, ...]) -> HoldableProxy:
    (proxy,) = (proxy for proxy in proxies if consumer.node == f"127.0.0.1:{proxy.port}")
    return proxy


class Recorder:
    """A handler that records the id of every event it is called with, slowly enough that
    some deliveries are unacknowledged when the connection goes."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def __call__(self, event: WebhookEvent) -> None:
        await asyncio.sleep(0.02)
        self.calls[event.id] += 1


async def publish_events(broker: Broker, exchange: str, signer: Signer, count: int) -> set[str]:
    """``count`` events published like the bridge; their event ids."""
    ids = set()
    for _ in range(count):
        body = sample_body("batch.completed")
        await publish_like_bridge(
            broker, exchange, body, signer.headers(body, webhook_id=new_webhook_id())
        )
        ids.add(parse_event(body).id)
    return ids


async def consume_across(
    broker: Broker,
    exchange: str,
    signer: Signer,
    fault: str,
) -> None:
    """Run a consumer of a named quorum queue over two nodes, publish 40 events, do
    ``fault`` to its node halfway, publish 40 more; every event is handled exactly once."""
    queue = unique_name("test.failover")
    broker.created_queues += [queue, f"{queue}.dead"]
    broker.created_exchanges.append(f"{queue}.dead")
    recorder = Recorder()
    async with two_nodes() as proxies:
        consumer = EventConsumer(
            node_urls(*proxies),
            exchange=exchange,
            patterns=["#"],
            queue=queue,
            quorum=True,
            dead_letter_exchange=f"{queue}.dead",
            idempotency=InMemoryIdempotencyStore(),
            prefetch=8,
            heartbeat=1,
            timeout=5,
        )
        async with consumer:
            running = asyncio.create_task(consumer.run(recorder, concurrency=4))
            try:
                first_node = proxy_of(consumer, proxies)
                published = await publish_events(broker, exchange, signer, 40)
                await wait_until(lambda: len(recorder.calls) >= 10, timeout=30)
                getattr(first_node, fault)()
                await wait_until(lambda: consumer.reconnects == 1, timeout=30)
                published |= await publish_events(broker, exchange, signer, 40)
                await wait_until(lambda: set(recorder.calls) >= published, timeout=60)
                assert not running.done(), "the consumer's loop never ended"
                assert proxy_of(consumer, proxies) is not first_node
            finally:
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
    assert set(recorder.calls) == published
    assert max(recorder.calls.values()) == 1, "an event was handled twice"


@pytest.mark.broker
async def test_a_lost_node_is_left_for_the_other_and_the_stream_goes_on(
    broker: Broker, exchange: str, signer: Signer
) -> None:
    await consume_across(broker, exchange, signer, "cut")


@pytest.mark.broker
async def test_a_frozen_node_is_given_up_after_the_heartbeat(
    broker: Broker, exchange: str, signer: Signer
) -> None:
    await consume_across(broker, exchange, signer, "hold")


@pytest.mark.broker
async def test_settling_on_a_lost_connection_is_logged_and_the_message_comes_back(
    broker: Broker, exchange: str, signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    queue = unique_name("test.failover")
    broker.created_queues.append(queue)
    async with two_nodes() as proxies:
        consumer = EventConsumer(
            node_urls(*proxies), exchange=exchange, patterns=["#"], queue=queue, timeout=5
        )
        async with consumer:
            body = sample_body("batch.completed")
            await publish_like_bridge(broker, exchange, body, signer.headers(body))
            deliveries = aiter(consumer)
            taken = await asyncio.wait_for(anext(deliveries), 10)
            proxy_of(consumer, proxies).cut()
            await wait_until(lambda: consumer.node is None, timeout=10)
            with caplog.at_level(logging.WARNING):
                await taken.ack()
            assert "the broker will redeliver the message" in caplog.text
            again = await asyncio.wait_for(anext(deliveries), 30)
            assert again.message_id == taken.message_id
            await again.ack()
            assert consumer.reconnects == 1


@pytest.mark.broker
async def test_a_dead_node_in_the_list_is_passed_over(exchange: str) -> None:
    dead = "amqp://guest:guest@127.0.0.1:1/"
    for _ in range(3):  # whatever the shuffled order
        async with EventConsumer(
            f"{dead},{AMQP_URL}", exchange=exchange, patterns=["#"]
        ) as consumer:
            assert consumer.node == node_address(URL(AMQP_URL))


def test_a_node_list_that_cannot_work_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="URL #2 must be an amqp:// or amqps:// URL"):
        EventConsumer(f"{AMQP_URL},http://rabbit-1/", patterns=["#"])
    with pytest.raises(ValueError, match="heartbeat"):
        EventConsumer(AMQP_URL, patterns=["#"], heartbeat=0)
    with pytest.raises(SettingsError, match="BRIDGE_AMQP_URL URL #1 must be"):
        ConsumerSettings.load(amqp_url="rabbit-0:5672")
