"""``EventConsumer``: a queue bound to the bridge's exchange, yielding checked, typed events."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
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
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
    ExchangeType,
)
from pydantic import ValidationError

from bridge.consumer.broker import (
    CONNECTION_NAME,
    PatternReader,
    check_queue_options,
    close_deliveries,
    require_exchange,
    tls_context,
)
from bridge.consumer.delivery import (
    Delivery,
    Handler,
    VerifySecrets,
    signature_problem,
    stored_message_verifier,
)
from bridge.consumer.retry import (
    CONNECTION_GONE,
    ROUTING_KEY_HEADER,
    RetryQueues,
    retry_count,
    settle,
)
from bridge.consumer.stores import IdempotencyStore
from bridge.dedup.store import ClaimState, StoreUnavailable
from bridge.events import parse_event
from bridge.extras import installed
from bridge.nodes import (
    BrokerNodes,
    backoff,
    describe,
    first_answering,
    node_address,
    parse_node_urls,
    retrieve_outcome,
    with_heartbeat,
    within,
)
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

    ``amqp_url`` is one node's URL or a cluster's comma-separated list, as the bridge
    takes them (``BRIDGE_AMQP_URL``). The consumer connects to one node (the list shuffled
    once, or by ``rng``, so that consumers spread), with ``heartbeat``-second heartbeats.
    When it loses that node, or the node freezes for (heartbeat + 1) x 3 seconds, it
    connects to the next one, in rounds spaced by backoff with jitter, declares and binds
    its queues again and goes on in the same iteration (and :meth:`run` loop): the
    messages it had not acknowledged come back from the broker, and an ``idempotency``
    store skips those already handled. A temporary queue is a new, empty one after a
    failover; a named queue keeps what arrived meanwhile. Every broker call is bounded
    by ``timeout`` seconds.
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
        heartbeat: int = 10,
        clock: Callable[[], float] = time.time,
        declare: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(exchange, patterns)
        if not declare and not queue:
            raise ValueError("a queue declared elsewhere needs its name")
        if isinstance(verify_secrets, str):
            raise ValueError("verify_secrets must be a list of secrets, not one string")
        check_queue_options(queue, prefetch=prefetch, quorum=quorum)
        if delivery_limit < 1:
            raise ValueError("delivery_limit must be at least 1")
        if isinstance(max_age, timedelta):
            max_age = max_age.total_seconds()
        if max_age is not None and max_age <= 0:
            raise ValueError("max_age must be positive (or None: no limit)")
        if busy_retry_seconds <= 0:
            raise ValueError("busy_retry_seconds must be positive")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if heartbeat < 1:
            raise ValueError("heartbeat must be at least 1 second")
        self._rng = rng or random.Random()  # noqa: S311  # node order and jitter, not secrets
        self._nodes = BrokerNodes(parse_node_urls(amqp_url), self._rng)
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
        self._heartbeat = heartbeat
        self._clock = clock
        self._declare = declare
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._retry_queues: RetryQueues | None = None
        self._stream: AsyncGenerator[Delivery, None] | None = None
        self._spans: SpanFactory | None = None
        self.rejections: Counter[str] = Counter()
        """Messages rejected here, by reason: ``signature``, ``not_an_event``,
        ``routing_key``, ``too_old``, ``handler_failed``."""
        self._closing_connections: set[asyncio.Future[None]] = set()
        self.reconnects = 0
        """How many times the consumer connected again after losing its connection."""

    @property
    def queue_name(self) -> str:
        return self._open_queue().name

    @property
    def node(self) -> str | None:
        """``host:port`` of the node the consumer is connected to, if it is."""
        connection = self._connection
        if connection is None or connection.is_closed or not connection.connected.is_set():
            return None
        return self._nodes.current

    @property
    def retry_queue_names(self) -> tuple[str, ...]:
        """The retry queues declared so far (one per delay used)."""
        return () if self._retry_queues is None else self._retry_queues.names

    async def __aenter__(self) -> Self:
        await self._connect()
        if self._queue_name is not None and self._declare and not self._dead_letter_exchange:
            logger.warning(
                "queue %s has no dead-letter exchange: the messages it rejects are dropped",
                self._queue_name,
            )
        return self

    async def _connect(self) -> None:
        """Connect to the first node of this round that answers, then declare and bind
        the queue (its dead letters too) on a new channel; raise if either fails."""
        url, connection = await first_answering(
            self._nodes,
            lambda url: aio_pika.connect(
                with_heartbeat(url, self._heartbeat),
                ssl_context=tls_context(str(url), self._ca_file),
                client_properties={"connection_name": CONNECTION_NAME},
                timeout=self._timeout,
            ),
            attempt_seconds=self._timeout,
        )
        try:
            channel, queue = await within(self._timeout, self._declare_on(connection))
        except BaseException:
            with contextlib.suppress(Exception):
                await within(self._timeout, connection.close())
            raise
        if self._retry_queues is None or self._queue_name is None:
            self._retry_queues = RetryQueues(
                channel,
                queue.name,
                named=self._queue_name is not None,
                queue_arguments=self._queue_arguments(dead_letter_exchange=""),
                timeout=self._timeout,
            )
        else:
            self._retry_queues = self._retry_queues.on(channel)
        self._spans = _consumer_spans(queue.name)
        self._connection, self._channel, self._queue = connection, channel, queue
        if self._nodes.connected_to(url):
            self.reconnects += 1
        logger.info("consuming from %s on broker node %s", queue.name, node_address(url))

    async def _declare_on(
        self, connection: AbstractConnection
    ) -> tuple[AbstractChannel, AbstractQueue]:
        """Declare and bind on the first connection; after a failover, check that a named
        queue is still there and declare it again only if not. A passive check reads the
        node's own copy of the metadata, so it answers even while a frozen node holds up
        every cluster-wide change until the other nodes declare it down (net_ticktime)."""
        await require_exchange(connection, self._exchange)
        # Returned copies (a retry queue deleted under us) must fail their publish.
        channel = await connection.channel(on_return_raises=True)
        await channel.set_qos(prefetch_count=self._prefetch)
        if self._queue_name is not None and self._queue is not None:
            if await _queue_exists(connection, self._queue_name):
                return channel, await channel.get_queue(self._queue_name, ensure=False)
            logger.warning("queue %s went missing; declaring it again", self._queue_name)
        return channel, await self._declare_queue(channel)

    async def _reconnect(self) -> None:
        """Connect again, to the next node first if the connection was lost, in rounds
        spaced by backoff with jitter, until connected and declared."""
        lost, lost_at = self._connection, time.monotonic()
        # Whether the node went or only the channel did (the connection learns a little
        # later), the next node of the round is tried first: in a cluster, any will do.
        logger.warning(
            "lost the consuming channel on broker node %s; failing over", self._nodes.current
        )
        self._nodes.lost_current()
        self._connection = self._channel = None
        if lost is not None and not lost.is_closed:
            # Closing towards a frozen node can take minutes: not waited for, but held on
            # to until done (the event loop keeps only weak references to tasks).
            closing = asyncio.ensure_future(lost.close())
            self._closing_connections.add(closing)
            closing.add_done_callback(self._closing_connections.discard)
            closing.add_done_callback(retrieve_outcome)
        failures, last_problem = 0, ""
        while True:
            try:
                await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # no node can serve the queue yet
                problem = describe(error)
                if problem != last_problem:
                    logger.warning("cannot consume yet: %s", problem)
                failures, last_problem = failures + 1, problem
                await asyncio.sleep(backoff(failures, self._rng))
                continue
            logger.info(
                "consuming again %.1f s after losing the connection",
                time.monotonic() - lost_at,
            )
            return

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
            self._prefetch = concurrency  # on every channel from now on
            await within(self._timeout, self._open_channel().set_qos(prefetch_count=concurrency))
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
        await settle()  # a connection lost meanwhile is logged: the broker redelivers it

    def _open_queue(self) -> AbstractQueue:
        if self._queue is None:
            raise RuntimeError("use the consumer inside 'async with'")
        return self._queue

    def _open_channel(self) -> AbstractChannel:
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

    async def _declare_queue(self, channel: AbstractChannel) -> AbstractQueue:
        if not self._declare:
            return await channel.declare_queue(self._queue_name, passive=True)
        if self._dead_letter_exchange:
            await self._declare_dead_letters(channel, self._dead_letter_exchange)
        return await self._declare_bound_queue(
            channel,
            self._queue_name,
            self._queue_arguments(dead_letter_exchange=self._dead_letter_exchange),
        )

    async def _declare_dead_letters(self, channel: AbstractChannel, name: str) -> None:
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
        """The queue's events, across connections: when the channel closes (its node lost,
        frozen past the heartbeat, or the broker closing it), connect to another node, find
        the queue there (declaring it only if it went missing) and go on, as one stream."""
        while True:
            channel = self._open_channel()
            with contextlib.suppress(*CONNECTION_GONE):
                async with queue.iterator() as messages:
                    async for message in messages:
                        if channel.is_closed:
                            continue  # taken before the channel closed: it comes back
                        delivery = await self._admit(message)
                        if delivery is not None:
                            yield delivery
            await self._reconnect()
            queue = self._open_queue()

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
            event,
            message,
            store,
            routing_key=routing_key,
            retry_queues=self._retry_queues,
            settle_timeout=self._timeout,
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
            await settle(message.ack(), message, self._timeout)
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
        await settle(message.reject(requeue=False), message, self._timeout)

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


async def _queue_exists(connection: AbstractConnection, name: str) -> bool:
    # A failed passive declare closes its channel, so it gets one of its own.
    async with connection.channel() as probe:
        try:
            await probe.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
    return True


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
