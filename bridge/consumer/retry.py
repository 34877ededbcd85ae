"""Handing a message back to its queue later, without the broker counting a redelivery.

``reject(requeue=True)`` counts toward a quorum queue's delivery limit (RabbitMQ 4.0 gives
every quorum queue one of 20), after which the broker dead-letters the message or, without
a dead-letter exchange, drops it. So a message handed back because another replica is
handling its id, because the idempotency store is unreachable, or because its handler
failed and will be tried again, is never requeued: a copy (same body, properties and
headers) is published to a retry queue, and the original is acknowledged once the broker
has confirmed the copy. A retry queue holds its messages for one delay (its message TTL),
then dead-letters them to the consumer queue through the default exchange, where each
arrives as a new message whose delivery count starts at zero. A crash between the confirm
and the acknowledgement leaves two copies, which the idempotency store tells apart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, DeliveryMode

from bridge.nodes import describe, within

logger = logging.getLogger(__name__)

RETRY_COUNT_HEADER = "x-retry-count"
"""How many times a handler failed on this message (absent: never)."""
ROUTING_KEY_HEADER = "x-original-routing-key"
"""The routing key the message was published with, kept across trips through a retry
queue (which deliver it to the consumer queue under the queue's own name)."""

BROKER_HEADERS = frozenset(
    {
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
"""Set by the broker when it delivers or dead-letters a message: a copy starts afresh, so
that its trips through a retry queue are never taken for a dead-letter cycle."""
CONNECTION_GONE = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
)
"""What consuming or settling raises once the channel or its connection is gone."""
_FAILURES = (*CONNECTION_GONE, TimeoutError)


def retry_queue_name(queue: str, delay_ms: int) -> str:
    """The retry queue holding ``queue``'s messages for ``delay_ms`` milliseconds."""
    return f"{queue}.retry.{delay_ms}ms"


def delay_ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def retry_count(message: AbstractIncomingMessage) -> int:
    count = message.headers.get(RETRY_COUNT_HEADER)
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 0


class RetryQueues:
    """The retry queues of one consumer queue, one per delay, declared when first used.

    A named consumer queue gets durable retry queues ``<queue>.retry.<delay>ms`` declared
    with ``queue_arguments`` (a quorum queue's type, delivery limit and at-least-once
    dead-lettering); a temporary one gets server-named ones that go away with the
    connection. Each holds a message for its delay, then dead-letters it to ``queue``
    through the default exchange.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        queue: str,
        *,
        named: bool,
        queue_arguments: Mapping[str, aiormq.abc.FieldValue],
        timeout: float,
    ) -> None:
        self._channel = channel
        self._queue = queue
        self._named = named
        self._queue_arguments = dict(queue_arguments)
        self._timeout = timeout
        self._by_delay: dict[int, str] = {}
        self._declaring = asyncio.Lock()

    def on(self, channel: AbstractChannel) -> RetryQueues:
        """These retry queues, used from ``channel`` (after a failover): a named queue's are
        durable and not declared again; a temporary one's went with their connection."""
        moved = RetryQueues(
            channel,
            self._queue,
            named=self._named,
            queue_arguments=self._queue_arguments,
            timeout=self._timeout,
        )
        if self._named:
            moved._by_delay = dict(self._by_delay)
        return moved

    @property
    def names(self) -> tuple[str, ...]:
        """The retry queues declared so far."""
        return tuple(self._by_delay.values())

    async def hand_back(
        self, message: AbstractIncomingMessage, *, delay: float, routing_key: str, retries: int
    ) -> None:
        """Have ``message`` delivered again after ``delay`` seconds, as a new message
        carrying ``retries`` (the handler failures so far), then acknowledge it.

        If the copy cannot be published, the message is requeued instead (which the
        delivery limit counts): the one way left that keeps it.
        """
        copy = _copy(message, routing_key=routing_key, retries=retries)
        try:
            async with asyncio.timeout(self._timeout):
                target = await self._queue_for(delay_ms(delay))
                await self._channel.default_exchange.publish(copy, target, mandatory=True)
        except _FAILURES as error:
            logger.warning(
                "could not hand a message to its retry queue; requeueing it",
                extra={"message_id": message.message_id, "reason": str(error) or repr(error)},
            )
            await settle(message.reject(requeue=True), message, self._timeout)
            return
        await settle(message.ack(), message, self._timeout)

    async def _queue_for(self, delay: int) -> str:
        async with self._declaring:
            if delay not in self._by_delay:
                arguments: dict[str, aiormq.abc.FieldValue] = {
                    **self._queue_arguments,
                    "x-message-ttl": delay,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self._queue,
                }
                if self._named:
                    queue = await self._channel.declare_queue(
                        retry_queue_name(self._queue, delay), durable=True, arguments=arguments
                    )
                else:
                    queue = await self._channel.declare_queue(
                        None, exclusive=True, auto_delete=True, arguments=arguments
                    )
                self._by_delay[delay] = queue.name
            return self._by_delay[delay]


async def settle(action: Awaitable[None], message: AbstractIncomingMessage, seconds: float) -> None:
    """Acknowledge or reject ``message`` through ``action`` within ``seconds``. Its channel
    may be gone (the connection lost): the broker then delivers the message again, so that
    is logged, not raised."""
    try:
        await within(seconds, action)
    except _FAILURES as error:
        logger.warning(
            "connection lost before settling; the broker will redeliver the message",
            extra={"message_id": message.message_id, "reason": describe(error)},
        )


def _copy(message: AbstractIncomingMessage, *, routing_key: str, retries: int) -> aio_pika.Message:
    headers = {name: value for name, value in message.headers.items() if name not in BROKER_HEADERS}
    headers[ROUTING_KEY_HEADER] = routing_key
    headers[RETRY_COUNT_HEADER] = retries
    # Not copied: an expiration would race the retry queue's own TTL, and a user_id other
    # than this connection's user is refused by the broker.
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )
