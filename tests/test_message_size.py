"""The largest body the bridge accepts is one the broker accepts: ``BRIDGE_MAX_BODY_BYTES``
is at most 16 MiB, RabbitMQ 4's default ``max_message_size``, and a body of exactly that
size is published and confirmed on every release; on 4.0 one byte more is refused by the
broker, which is why the bound is where it is."""

from __future__ import annotations

import aio_pika
import aiormq
import pytest

from bridge.frames import MessageProperties
from bridge.publisher import AmqpPublisher, BrokerUnavailable, Outcome, OutgoingMessage
from bridge.samples import new_webhook_id
from bridge.settings import BROKER_MAX_MESSAGE_BYTES, SettingsError
from tests.brokers import RabbitMQ
from tests.conftest import Broker, Signer, make_settings, until_publisher_ready


def test_a_larger_maximum_than_the_broker_takes_is_refused_in_one_line(signer: Signer) -> None:
    with pytest.raises(SettingsError, match="BRIDGE_MAX_BODY_BYTES must be at most 16777216"):
        make_settings(signer, max_body_bytes=BROKER_MAX_MESSAGE_BYTES + 1)


def message(exchange: str, size: int) -> OutgoingMessage:
    # The broker checks the size, not the content: any bytes of that length do.
    return OutgoingMessage(
        b"x" * size,
        exchange,
        "batch.completed",
        quarantined=False,
        properties=MessageProperties(message_id=new_webhook_id()),
    )


@pytest.mark.broker
async def test_a_body_of_the_largest_size_allowed_is_published_and_confirmed(
    signer: Signer, broker: Broker, rabbitmq: RabbitMQ
) -> None:
    settings = make_settings(
        signer,
        max_body_bytes=BROKER_MAX_MESSAGE_BYTES,
        max_buffered_bytes=2 * BROKER_MAX_MESSAGE_BYTES,
        publish_timeout=30.0,
    )
    publisher = AmqpPublisher(settings)
    broker.forget_topology(publisher.topology)
    await publisher.start()
    try:
        await until_publisher_ready(publisher, 30)
        queue = await broker.bind_queue(settings.exchange, "#")
        largest = message(settings.exchange, settings.max_body_bytes)
        assert await publisher.publish(largest) is Outcome.PUBLISHED
        arrived = await broker.get(queue, timeout=30)
        assert arrived.body == largest.body
        assert arrived.message_id == largest.properties.message_id
        if rabbitmq.release.version != "4.0":
            return  # 3.x's default limit is 128 MiB
        with pytest.raises(BrokerUnavailable):
            await publisher.publish(message(settings.exchange, settings.max_body_bytes + 1))
        # The broker's own words for it, on a channel of the test's.
        async with broker.connection.channel() as channel:
            with pytest.raises(
                aiormq.exceptions.ChannelPreconditionFailed,
                match=f"message size {BROKER_MAX_MESSAGE_BYTES + 1} is larger than configured "
                f"max size {BROKER_MAX_MESSAGE_BYTES}",
            ):
                await channel.default_exchange.publish(
                    aio_pika.Message(b"x" * (BROKER_MAX_MESSAGE_BYTES + 1)), queue
                )
    finally:
        await publisher.close()
