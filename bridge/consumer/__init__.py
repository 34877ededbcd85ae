"""Consuming the bridge's events: typed, acknowledged, optionally re-verified and deduplicated.

:class:`EventConsumer` declares a queue, binds it to the bridge's topic exchange
with routing-key patterns and hands over each message as a :class:`Delivery`
holding the parsed event, to acknowledge, retry or reject. Messages that cannot be
trusted or parsed never reach the caller: they are rejected without requeueing,
which moves them to the dead-letter exchange when the queue has one::

    async with EventConsumer(url, patterns=["batch.*"], queue="billing") as consumer:
        async for delivery in consumer:
            ...
            await delivery.ack()

:class:`ObjectConsumer` reads ``<exchange>.objects`` the same way, where
``webhook-bridge hydrate`` publishes the object behind each event.
"""

from bridge.consumer.broker import (
    CONNECTION_NAME,
    ConsumerSettings,
    ExchangeNotFoundError,
    PatternReader,
    close_deliveries,
    connect_to_a_node,
    tls_context,
)
from bridge.consumer.delivery import (
    Delivery,
    Handler,
    PerSourceVerifier,
    VerifySecrets,
    WebhookEvent,
    message_source,
    signature_problem,
    stored_message_verifier,
)
from bridge.consumer.event_consumer import DEFAULT_DELIVERY_LIMIT, EventConsumer, _consumer_spans
from bridge.consumer.objects import ObjectConsumer, ObjectDelivery
from bridge.consumer.retry import RETRY_COUNT_HEADER, ROUTING_KEY_HEADER, retry_queue_name
from bridge.consumer.stores import IdempotencyStore, InMemoryIdempotencyStore
from bridge.dedup.store import ClaimState

__all__ = [
    "CONNECTION_NAME",
    "DEFAULT_DELIVERY_LIMIT",
    "RETRY_COUNT_HEADER",
    "ROUTING_KEY_HEADER",
    "ClaimState",
    "ConsumerSettings",
    "Delivery",
    "EventConsumer",
    "ExchangeNotFoundError",
    "Handler",
    "IdempotencyStore",
    "InMemoryIdempotencyStore",
    "ObjectConsumer",
    "ObjectDelivery",
    "PatternReader",
    "PerSourceVerifier",
    "VerifySecrets",
    "WebhookEvent",
    "_consumer_spans",
    "close_deliveries",
    "connect_to_a_node",
    "message_source",
    "retry_queue_name",
    "signature_problem",
    "stored_message_verifier",
    "tls_context",
]
