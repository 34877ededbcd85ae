"""``EventConsumer``: a queue bound to the bridge's exchange, yielding checked, typed events."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Self

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    ExchangeType,
)
from pydantic import ValidationError

from bridge.consumer.broker import (
    PatternReader,
    close_deliveries,
    connect_to_a_node,
    require_exchange,
)
from bridge.consumer.delivery import (
    Delivery,
    Handler,
    VerifySecrets,
    signature_problem,
    stored_message_verifier,
)
from bridge.consumer.retry import ROUTING_KEY_HEADER, RetryQueues, retry_count
from bridge.consumer.stores import IdempotencyStore
from bridge.dedup.store import ClaimState, StoreUnavailable
from bridge.events import parse_event
from bridge.extras import installed
from bridge.settings import DEFAULT_EXCHANGE
from bridge.tracing import SpanFactory, handling

logger = logging.getLogger(__name__)

DEFAULT_DELIVERY_LIMIT = 20
"""Deliveries of one message a quorum queue allows before dead-lettering it: RabbitMQ
4.0's default, set explicitly so that 3.x counts the same way."""

# A dead-letter queue is read by people and by `replay`, which leaves what it does not
# replay in place by requeueing it: it must never drop a message for being requeued.
_DEAD_LETTER_DELIVERY_LIMIT = 2**31 - 1

_QueueArguments = dict[str, aiormq.abc.FieldValue]

_REFUSALS = {
    "signature": "rejecting a message that fails signature verification",
    "not_an_event": "rejecting a message that is not a webhook event",
    "routing_key": "rejecting a message whose routing key is not its signed type",
    "too_old": "rejecting a message older than max_age",
}


class EventConsumer(PatternReader):
    """A queue bound to the bridge's exchange, yielding typed events.

    ``queue`` names a durable queue that keeps events while no consumer runs;
    without it the queue is temporary (exclusive, deleted on disconnect).
    ``quorum=True`` makes the named queue a replicated quorum queue, recommended
    in production, with ``delivery_limit`` deliveries of a message before the broker
    dead-letters it. ``dead_letter_exchange`` is declared (durable fanout, with a
    durable queue of the same name) and receives every rejected message.
    ``verify_secrets`` (the ``whsec_`` secrets OpenAI signs with, or with sources a mapping
    of each source's: see :class:`PerSourceVerifier`) re-checks each
    message's original signature, so events published by anyone else are refused;
    so are messages whose routing key is not their body's type, and with ``max_age``
    messages signed longer ago than that. ``idempotency`` skips a ``message_id``
    already handled, and hands a message whose id another replica is handling back
    to the queue ``busy_retry_seconds`` later, through a retry queue (see
    :mod:`bridge.consumer.retry`). ``ca_file`` verifies an ``amqps://`` broker
    against that CA bundle instead of the system's. ``declare=False`` takes the named
    queue as it is, declared with its bindings elsewhere, and only checks that it exists.
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
        dead_letter_exchange: str | None = None,
        delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
        verify_secrets: VerifySecrets = (),
        max_age: float | timedelta | None = None,
        idempotency: IdempotencyStore | None = None,
        busy_retry_seconds: float = 1.0,
        ca_file: str | Path | None = None,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        declare: bool = True,
    ) -> None:
        super().__init__(exchange, patterns)
        if not declare and not queue:
            raise ValueError("a queue declared elsewhere needs its name")
        if isinstance(verify_secrets, str):
            raise ValueError("verify_secrets must be a list of secrets, not one string")
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        if quorum and not queue:
            raise ValueError("a quorum queue needs a name: quorum queues are durable and shared")
        if delivery_limit < 1:
            raise ValueError("delivery_limit must be at least 1")
        if isinstance(max_age, timedelta):
            max_age = max_age.total_seconds()
        if max_age is not None and max_age <= 0:
            raise ValueError("max_age must be positive (or None: no limit)")
        if busy_retry_seconds <= 0:
            raise ValueError("busy_retry_seconds must be positive")
        self._amqp_url = amqp_url
        self._queue_name = queue
        self._prefetch = prefetch
        self._quorum = quorum
        self._dead_letter_exchange = dead_letter_exchange
        self._delivery_limit = delivery_limit
        self._verifier = stored_message_verifier(verify_secrets)
        self._max_age = max_age
        self._idempotency = idempotency
        self._busy_retry_seconds = busy_retry_seconds
        self._ca_file = ca_file
        self._timeout = timeout
        self._clock = clock
        self._declare = declare
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._queue: AbstractQueue | None = None
        self._retry_queues: RetryQueues | None = None
        self._stream: AsyncGenerator[Delivery, None] | None = None
        self._spans: SpanFactory | None = None
        self.rejections: Counter[str] = Counter()
        """Messages rejected here, by reason: ``signature``, ``not_an_event``,
        ``routing_key``, ``too_old``, ``handler_failed``."""

    @property
    def queue_name(self) -> str:
        return self._open_queue().name

    @property
    def retry_queue_names(self) -> tuple[str, ...]:
        """The retry queues declared so far (one per delay used)."""
        return () if self._retry_queues is None else self._retry_queues.names

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
                # Returned copies (a retry queue deleted under us) must fail their publish.
                channel = await connection.channel(on_return_raises=True)
                await channel.set_qos(prefetch_count=self._prefetch)
                queue = await self._declare_queue(channel)
            named = self._queue_name is not None
            if named and self._declare and not self._dead_letter_exchange:
                logger.warning(
                    "queue %s has no dead-letter exchange: the messages it rejects are dropped",
                    queue.name,
                )
            self._retry_queues = RetryQueues(
                channel,
                queue.name,
                named=named,
                queue_arguments=self._queue_arguments(dead_letter_exchange=""),
                timeout=self._timeout,
            )
            self._spans = _consumer_spans(queue.name)
            self._connection, self._channel, self._queue = connection, channel, queue
            on_failure.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        connection, stream = self._connection, self._stream
        self._connection, self._channel, self._queue, self._stream = None, None, None, None
        await close_deliveries(stream, connection, self._timeout)

    def __aiter__(self) -> AsyncIterator[Delivery]:
        # One stream per consumer: a loop left with `break` and a later loop share it,
        # instead of a forgotten broker-side consumer holding prefetched messages.
        if self._stream is None:
            self._stream = self._deliveries(self._open_queue())
        return self._stream

    async def run(
        self, handler: Handler, *, retries: int = 0, backoff: float = 1.0, concurrency: int = 1
    ) -> None:
        """Call ``handler`` with each event until cancelled, up to ``concurrency`` at once.

        A handler that returns acknowledges the message. One that raises has its event
        delivered again ``backoff`` seconds later, then twice as long after each further
        failure, ``retries`` times (through the same retry queues as busy ids; the broker
        does not count these toward the delivery limit); after that, the message is
        rejected (to the dead-letter exchange, if any) and the loop goes on. Each handler
        runs inside the message's trace context: ``current_trace()`` of
        :mod:`bridge.tracing` returns it, and with OpenTelemetry's API installed a
        consumer span continues the webhook request's trace.
        """
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        if backoff <= 0:
            raise ValueError("backoff must be positive")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if concurrency > self._prefetch:
            await self._open_channel().set_qos(prefetch_count=concurrency)
        deliveries = aiter(self)
        free = asyncio.Semaphore(concurrency)
        try:
            async with asyncio.TaskGroup() as handlers:
                while True:
                    # A free slot first, so that a message is claimed only when it can start.
                    await free.acquire()
                    try:
                        delivery = await anext(deliveries)
                    except StopAsyncIteration:
                        return
                    task = handlers.create_task(self._handle(handler, delivery, retries, backoff))
                    task.add_done_callback(lambda _: free.release())
        except BaseExceptionGroup as failures:
            # The first failure ends the loop, raised as itself, as one handler at a time did.
            raise failures.exceptions[0] from None

    async def _handle(
        self, handler: Handler, delivery: Delivery, retries: int, backoff: float
    ) -> None:
        settle: Callable[[], Awaitable[None]]
        context = {"message_id": delivery.message_id, "routing_key": delivery.routing_key}
        try:
            with handling(delivery.trace, self._spans):
                await handler(delivery.event)
        except Exception:
            if delivery.retries < retries:
                delay = backoff * 2**delivery.retries
                logger.warning(
                    "handler failed; trying again in %g s", delay, extra=context, exc_info=True
                )
                settle = functools.partial(delivery.retry, delay)
            else:
                logger.exception("handler failed; rejecting the message", extra=context)
                self.rejections["handler_failed"] += 1
                settle = delivery.reject
        else:
            settle = delivery.ack
        try:
            await settle()
        except aiormq.exceptions.ChannelInvalidStateError:
            # The connection dropped with this delivery unsettled: the broker hands
            # it out again after the robust connection is back, so carry on.
            logger.warning(
                "connection lost before settling; the broker will redeliver", extra=context
            )

    def _open_queue(self) -> AbstractQueue:
        if self._queue is None:
            raise RuntimeError("use the consumer inside 'async with'")
        return self._queue

    def _open_channel(self) -> AbstractRobustChannel:
        if self._channel is None:
            raise RuntimeError("use the consumer inside 'async with'")
        return self._channel

    def _queue_arguments(self, *, dead_letter_exchange: str | None) -> _QueueArguments:
        arguments: _QueueArguments = {}
        if dead_letter_exchange is not None:
            arguments["x-dead-letter-exchange"] = dead_letter_exchange
        if self._quorum:
            arguments["x-queue-type"] = "quorum"
            arguments["x-delivery-limit"] = self._delivery_limit
            if dead_letter_exchange is not None:
                # The default, at-most-once, loses a dead letter the broker fails to move.
                arguments["x-dead-letter-strategy"] = "at-least-once"
                arguments["x-overflow"] = "reject-publish"
        return arguments

    async def _declare_queue(self, channel: AbstractRobustChannel) -> AbstractQueue:
        if not self._declare:
            return await channel.declare_queue(self._queue_name, passive=True)
        if self._dead_letter_exchange:
            await self._declare_dead_letters(channel, self._dead_letter_exchange)
        named = self._queue_name is not None
        queue = await channel.declare_queue(
            self._queue_name,
            durable=named,
            exclusive=not named,
            auto_delete=not named,
            arguments=self._queue_arguments(dead_letter_exchange=self._dead_letter_exchange),
        )
        for pattern in self._patterns:
            await queue.bind(self._exchange, routing_key=pattern)
        return queue

    async def _declare_dead_letters(self, channel: AbstractRobustChannel, name: str) -> None:
        # Without a queue behind it, a dead-letter exchange silently discards what it receives.
        exchange = await channel.declare_exchange(name, ExchangeType.FANOUT, durable=True)
        arguments: _QueueArguments = (
            {"x-queue-type": "quorum", "x-delivery-limit": _DEAD_LETTER_DELIVERY_LIMIT}
            if self._quorum
            else {}
        )
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
        await queue.bind(exchange)

    async def _deliveries(self, queue: AbstractQueue) -> AsyncGenerator[Delivery, None]:
        async with queue.iterator() as messages:
            async for message in messages:
                delivery = await self._admit(message)
                if delivery is not None:
                    yield delivery

    async def _admit(self, message: AbstractIncomingMessage) -> Delivery | None:
        """The message as a :class:`Delivery`, or ``None`` when it was settled here."""
        context = {"message_id": message.message_id, "routing_key": message.routing_key}
        if self._verifier is not None:
            problem = signature_problem(self._verifier, message)
            if problem is not None:
                await self._refuse(message, "signature", problem, context)
                return None
        try:
            event = parse_event(message.body)
        except ValidationError as error:
            await self._refuse(message, "not_an_event", _first_problem(error), context)
            return None
        routing_key = self._published_routing_key(message)
        if routing_key is not None and routing_key != event.type:
            problem = f"routing key {routing_key!r} is not the signed type {event.type!r}"
            await self._refuse(message, "routing_key", problem, context)
            return None
        problem = self._age_problem(message)
        if problem is not None:
            await self._refuse(message, "too_old", problem, context)
            return None
        routing_key = (message.routing_key or "") if routing_key is None else routing_key
        store = self._idempotency if message.message_id is not None else None
        if store is not None and not await self._claim(store, message, routing_key, context):
            return None
        return Delivery(
            event, message, store, routing_key=routing_key, retry_queues=self._retry_queues
        )

    async def _claim(
        self,
        store: IdempotencyStore,
        message: AbstractIncomingMessage,
        routing_key: str,
        context: dict[str, str | None],
    ) -> bool:
        """Whether the message's id is now ours to handle; if not, it was settled here."""
        try:
            state = await store.claim(message.message_id or "")
        except StoreUnavailable as error:
            logger.warning(
                "idempotency store unavailable; the message goes back to the queue",
                extra={**context, "reason": str(error)},
            )
            state = ClaimState.IN_FLIGHT
        if state is ClaimState.CONFIRMED:
            logger.info("skipping a message already handled", extra=context)
            await message.ack()
            return False
        if state is ClaimState.IN_FLIGHT:
            # By then its other copy is done or released (or the store is back).
            await self._open_retry_queues().hand_back(
                message,
                delay=self._busy_retry_seconds,
                routing_key=routing_key,
                retries=retry_count(message),
            )
            return False
        return True

    async def _refuse(
        self,
        message: AbstractIncomingMessage,
        reason: str,
        problem: str,
        context: dict[str, str | None],
    ) -> None:
        self.rejections[reason] += 1
        logger.warning(_REFUSALS[reason], extra={**context, "reason": problem})
        await message.reject(requeue=False)

    def _published_routing_key(self, message: AbstractIncomingMessage) -> str | None:
        """The routing key the message claims to have been published with, or ``None`` for
        one addressed to this queue by name without a claim (``replay --to-queue``)."""
        if message.exchange == "" and message.routing_key == self._open_queue().name:
            # Through the default exchange: from a retry queue, which names the routing
            # key in a header, or published straight to this queue.
            claimed = message.headers.get(ROUTING_KEY_HEADER)
            return claimed if isinstance(claimed, str) else None
        return message.routing_key or ""

    def _age_problem(self, message: AbstractIncomingMessage) -> str | None:
        if self._max_age is None:
            return None
        timestamp = message.headers.get("webhook-timestamp")
        try:
            signed_at = int(timestamp) if isinstance(timestamp, str) else None
        except ValueError:
            signed_at = None
        if signed_at is None:
            return "no webhook-timestamp to tell its age by"
        age = self._clock() - signed_at
        if age > self._max_age:
            return f"signed {age:.0f} s ago, longer than max_age ({self._max_age:g} s)"
        return None

    def _open_retry_queues(self) -> RetryQueues:
        if self._retry_queues is None:
            raise RuntimeError("use the consumer inside 'async with'")
        return self._retry_queues


def _first_problem(error: ValidationError) -> str:
    # Locations and messages only: the input may hold anything.
    first = error.errors(include_url=False, include_context=False, include_input=False)[0]
    location = ".".join(str(part) for part in first["loc"])
    return f"{location}: {first['msg']}" if location else first["msg"]


def _consumer_spans(queue: str) -> SpanFactory | None:
    """Consumer spans when OpenTelemetry's API is installed; without it, only
    :func:`bridge.tracing.current_trace` inside handlers."""
    if not installed("opentelemetry.trace"):
        return None
    from bridge.tracing.api import consumer_spans

    return consumer_spans(queue)
