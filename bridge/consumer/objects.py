"""``ObjectConsumer``: a queue bound to ``<exchange>.objects``, yielding hydrated objects.

``webhook-bridge hydrate`` publishes the object behind each event there, routed by the
event's type (:mod:`bridge.hydrate`). Each message becomes an :class:`ObjectDelivery`:
the object as openai-python's type when ``openai`` is installed (``Batch``,
``Response``, ...; built without validation, as the SDK builds its answers), the parsed
JSON otherwise, with the event's ids::

    async with ObjectConsumer(url, patterns=["batch.*"], queue="billing.batches") as objects:
        async for delivery in objects:
            batch = delivery.object  # openai.types.Batch
            ...
            await delivery.ack()
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from bridge.consumer.broker import (
    PatternReader,
    check_queue_options,
    close_deliveries,
    connect_to_a_node,
    require_exchange,
)
from bridge.extras import installed
from bridge.settings import DEFAULT_EXCHANGE

logger = logging.getLogger(__name__)

__all__ = ["SDK_TYPES", "ObjectConsumer", "ObjectDelivery"]

SDK_TYPES = {
    "batch": ("openai.types", "Batch"),
    "response": ("openai.types.responses", "Response"),
    "fine_tuning.job": ("openai.types.fine_tuning", "FineTuningJob"),
    "video": ("openai.types", "Video"),
    "agent.session": ("openai.types.beta.agent_session", "AgentSession"),
    "agent.environment": ("openai.types.beta.agents.environment_info", "EnvironmentInfo"),
    "safety.alert": ("openai.types.safety", "SafetyAlert"),
    "safety.case": ("openai.types.safety", "SafetyCase"),
}
"""openai-python's type for each ``object`` the worker publishes."""


class ObjectDelivery:
    """One hydrated object taken from the queue: acknowledge or reject it exactly once."""

    __slots__ = ("message", "object")

    def __init__(self, obj: Any, message: AbstractIncomingMessage) -> None:
        self.object = obj
        """openai-python's model of the object, or its parsed JSON without ``openai``."""
        self.message = message

    @property
    def body(self) -> bytes:
        """The object's JSON exactly as the API returned it."""
        return self.message.body

    @property
    def routing_key(self) -> str:
        """The event's type."""
        return self.message.routing_key or ""

    @property
    def message_id(self) -> str | None:
        """The event's ``webhook-id``."""
        return self.message.message_id

    @property
    def event_id(self) -> str | None:
        return _text(self.message.headers.get("x-event-id"))

    @property
    def event_type(self) -> str | None:
        return _text(self.message.headers.get("x-event-type"))

    @property
    def object_type(self) -> str | None:
        return _text(self.message.headers.get("x-object-type"))

    @property
    def source(self) -> str | None:
        return _text(self.message.headers.get("x-webhook-source"))

    @property
    def stale(self) -> bool:
        """Whether the object never caught up with its event (``x-object-stale``)."""
        return self.message.headers.get("x-object-stale") is True

    async def ack(self) -> None:
        await self.message.ack()

    async def reject(self, *, requeue: bool = False) -> None:
        await self.message.reject(requeue=requeue)


class ObjectConsumer(PatternReader):
    """A queue bound to ``<exchange>.objects`` with routing-key patterns (event types).

    ``queue`` names a durable queue that keeps objects while no consumer runs (a quorum
    queue with ``quorum=True``); without it the queue is temporary. A message whose body
    is not a JSON object is rejected (to the queue's dead-letter exchange, if any).
    """

    def __init__(
        self,
        amqp_url: str,
        *,
        patterns: Sequence[str],
        exchange: str = DEFAULT_EXCHANGE,
        queue: str | None = None,
        prefetch: int = 32,
        quorum: bool = False,
        ca_file: str | Path | None = None,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(f"{exchange}.objects", patterns)
        check_queue_options(queue, prefetch=prefetch, quorum=quorum)
        self._amqp_url = amqp_url
        self._queue_name = queue
        self._prefetch = prefetch
        self._quorum = quorum
        self._ca_file = ca_file
        self._timeout = timeout
        self._connection: AbstractRobustConnection | None = None
        self._queue: AbstractQueue | None = None
        self._stream: AsyncGenerator[ObjectDelivery, None] | None = None

    @property
    def queue_name(self) -> str:
        if self._queue is None:
            raise RuntimeError("use the consumer inside 'async with'")
        return self._queue.name

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as on_failure:
            async with asyncio.timeout(self._timeout):
                connection = await connect_to_a_node(
                    self._amqp_url,
                    aio_pika.connect_robust,
                    attempt_seconds=self._timeout,
                    ca_file=self._ca_file,
                )
                on_failure.push_async_callback(connection.close)
                await require_exchange(connection, self._exchange)
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=self._prefetch)
                queue = await self._declare_bound_queue(
                    channel,
                    self._queue_name,
                    {"x-queue-type": "quorum"} if self._quorum else None,
                )
            self._connection, self._queue = connection, queue
            on_failure.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        connection, stream = self._connection, self._stream
        self._connection, self._queue, self._stream = None, None, None
        await close_deliveries(stream, connection, self._timeout)

    def __aiter__(self) -> AsyncIterator[ObjectDelivery]:
        if self._queue is None:
            raise RuntimeError("use the consumer inside 'async with'")
        if self._stream is None:
            self._stream = self._deliveries(self._queue)
        return self._stream

    async def _deliveries(self, queue: AbstractQueue) -> AsyncGenerator[ObjectDelivery, None]:
        async with queue.iterator() as messages:
            async for message in messages:
                try:
                    document = json.loads(message.body)
                except ValueError:
                    document = None
                if not isinstance(document, dict):
                    logger.warning(
                        "rejecting a message that is not a JSON object",
                        extra={"message_id": message.message_id},
                    )
                    await message.reject(requeue=False)
                    continue
                yield ObjectDelivery(as_sdk_object(document), message)


def as_sdk_object(document: dict[str, Any]) -> Any:
    """``document`` as openai-python's type for its ``object``, when ``openai`` is installed
    and knows it; else ``document`` itself."""
    known = SDK_TYPES.get(str(document.get("object")))
    if known is None or not installed("openai"):
        return document
    module, name = known
    model = getattr(importlib.import_module(module), name)
    return model.construct(**document)


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None
