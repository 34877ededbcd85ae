"""Consuming the bridge's events: typed, acknowledged, optionally re-verified and deduplicated.

:class:`EventConsumer` declares a queue, binds it to the bridge's topic exchange
with routing-key patterns and hands over each message as a :class:`Delivery`
holding the parsed event, to acknowledge or reject. Messages that cannot be
trusted or parsed never reach the caller: they are rejected without requeueing,
which moves them to the dead-letter exchange when the queue has one::

    async with EventConsumer(url, patterns=["batch.*"], queue="billing") as consumer:
        async for delivery in consumer:
            ...
            await delivery.ack()
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Protocol, Self, TypeAlias, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    ExchangeType,
)
from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from bridge.dedup.store import ClaimState, StoreUnavailable
from bridge.events import UnknownWebhookEvent, UnwrapWebhookEvent, parse_event
from bridge.extras import installed
from bridge.publisher import VALIDATED_HEADER
from bridge.settings import (
    DEFAULT_EXCHANGE,
    ENV_PREFIX,
    LogFormat,
    LogLevel,
    Settings,
    default_secrets_dir,
)
from bridge.signature import (
    SignatureVerifier,
    WebhookHeaders,
    WebhookVerificationError,
    decode_secret,
)
from bridge.tracing import SpanFactory, TraceContext, handling, message_context

__all__ = [
    "ClaimState",
    "ConsumerSettings",
    "Delivery",
    "EventConsumer",
    "ExchangeNotFoundError",
    "Handler",
    "IdempotencyStore",
    "InMemoryIdempotencyStore",
    "WebhookEvent",
]

logger = logging.getLogger(__name__)

WebhookEvent: TypeAlias = UnwrapWebhookEvent | UnknownWebhookEvent
"""A known event's model, or the envelope of a type this version does not model."""

Handler: TypeAlias = Callable[[WebhookEvent], Awaitable[None]]

CONNECTION_NAME = "openai-webhook-bridge consumer"
ConnectionT = TypeVar("ConnectionT")


async def connect_to_a_node(
    amqp_url: str, connect: Callable[..., Awaitable[ConnectionT]], *, attempt_seconds: float
) -> ConnectionT:
    """Connect to the first node of ``amqp_url`` (one URL, or a cluster's comma-separated
    list, as ``BRIDGE_AMQP_URL`` takes them) that answers, in order."""
    *others, last = (url.strip() for url in amqp_url.split(","))
    attempt = functools.partial(
        connect, client_properties={"connection_name": CONNECTION_NAME}, timeout=attempt_seconds
    )
    for url in others:
        with contextlib.suppress(OSError, aio_pika.exceptions.AMQPError, TimeoutError):
            return await attempt(url)
    return await attempt(last)


# Queued messages are legitimately old (a consumer may have been down for hours), and the
# bridge already applied the replay window when OpenAI delivered them: only the HMAC is re-checked.
_ANY_AGE = sys.maxsize


class ExchangeNotFoundError(Exception):
    """The exchange to bind to does not exist (the bridge declares it when it starts)."""

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange
        super().__init__(f"exchange {exchange!r} does not exist")


class ConsumerSettings(BaseSettings):
    """Where the bridge publishes, read from its own ``BRIDGE_*`` variables and secret files.

    Unlike :class:`bridge.settings.Settings`, it needs no webhook secret: consuming
    without re-verifying signatures does not involve one.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore", hide_input_in_errors=True
    )

    amqp_url: SecretStr = Settings.model_fields["amqp_url"].default
    exchange: str = DEFAULT_EXCHANGE
    log_level: LogLevel = "INFO"
    log_format: LogFormat = "auto"

    @classmethod
    def load(cls, **overrides: Any) -> ConsumerSettings:
        """Read ``overrides``, then the environment, then ``$BRIDGE_SECRETS_DIR`` files."""
        secrets_dir = default_secrets_dir()
        return cls(_secrets_dir=secrets_dir if secrets_dir.is_dir() else None, **overrides)


class IdempotencyStore(Protocol):
    """Claims each ``message_id`` before it is handled, and remembers it once handled.

    The same ``message_id`` can arrive twice (OpenAI delivered the webhook again and
    the bridge had no shared deduplication store, or a 503 whose publish was stored
    anyway). ``claim`` answers ``NEW`` (handle it; then ``done`` or ``release``),
    ``CONFIRMED`` (handled already: skipped) or ``IN_FLIGHT`` (another replica is
    handling it: requeued to look again later). Replicas sharing a queue need a store
    they share: :class:`bridge.dedup.idempotency.RedisIdempotencyStore`, or a unique key
    in the database the handler writes to. May raise :class:`StoreUnavailable`.
    """

    async def claim(self, message_id: str) -> ClaimState: ...

    async def done(self, message_id: str) -> None: ...

    async def release(self, message_id: str) -> None: ...


class InMemoryIdempotencyStore:
    """A per-process store, bounded in size and age: enough for a single consumer process."""

    def __init__(
        self,
        *,
        max_ids: int = 100_000,
        ttl_seconds: float = 72 * 3600,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_ids < 1 or ttl_seconds <= 0:
            raise ValueError("max_ids and ttl_seconds must be positive")
        self._max_ids = max_ids
        self._ttl_seconds = ttl_seconds
        self._clock = clock
        self._expiry_by_id: OrderedDict[str, float] = OrderedDict()
        self._claimed: set[str] = set()

    def __len__(self) -> int:
        return len(self._expiry_by_id)

    async def claim(self, message_id: str) -> ClaimState:
        now = self._clock()
        # Every entry lives equally long and marking moves it last, so the oldest come first.
        while self._expiry_by_id:
            oldest, expiry = next(iter(self._expiry_by_id.items()))
            if expiry > now:
                break
            del self._expiry_by_id[oldest]
        if message_id in self._expiry_by_id:
            return ClaimState.CONFIRMED
        if message_id in self._claimed:
            return ClaimState.IN_FLIGHT
        self._claimed.add(message_id)
        return ClaimState.NEW

    async def done(self, message_id: str) -> None:
        self._claimed.discard(message_id)
        self._expiry_by_id[message_id] = self._clock() + self._ttl_seconds
        self._expiry_by_id.move_to_end(message_id)
        while len(self._expiry_by_id) > self._max_ids:
            self._expiry_by_id.popitem(last=False)

    async def release(self, message_id: str) -> None:
        self._claimed.discard(message_id)


class Delivery:
    """One event taken from the queue: acknowledge or reject it exactly once."""

    __slots__ = ("_idempotency", "event", "message")

    def __init__(
        self,
        event: WebhookEvent,
        message: AbstractIncomingMessage,
        idempotency: IdempotencyStore | None = None,
    ) -> None:
        self.event = event
        self.message = message
        self._idempotency = idempotency

    @property
    def body(self) -> bytes:
        """The exact bytes OpenAI sent."""
        return self.message.body

    @property
    def routing_key(self) -> str:
        return self.message.routing_key or ""

    @property
    def message_id(self) -> str | None:
        """The ``webhook-id``: the same for every copy of one webhook."""
        return self.message.message_id

    @property
    def validated(self) -> bool:
        """Whether the bridge validated the event against its model (not for unknown types)."""
        return self.message.headers.get(VALIDATED_HEADER) is True

    @property
    def trace(self) -> TraceContext | None:
        """The W3C trace context the message carries (the webhook request's, continued)."""
        return message_context(self.message.headers)

    async def ack(self) -> None:
        """Record the message as handled, then remove it from the queue.

        In this order, a crash in between redelivers a message the store skips. If the
        store cannot record it, the message is still acknowledged (it was handled); the
        cost is a possible second handling of a later copy.
        """
        if self._idempotency is not None and self.message_id is not None:
            try:
                await self._idempotency.done(self.message_id)
            except StoreUnavailable as error:
                logger.warning(
                    "could not record a handled message in the idempotency store",
                    extra={"message_id": self.message_id, "reason": str(error)},
                )
        await self.message.ack()

    async def reject(self, *, requeue: bool = False) -> None:
        """Give the message up: dead-letter it (or drop it, without a dead-letter exchange).

        ``requeue=True`` puts it back in the queue instead, for failures a retry can
        fix; a message that always fails would then come back forever. Either way its
        claim is released, so the next copy is handled.
        """
        if self._idempotency is not None and self.message_id is not None:
            with contextlib.suppress(StoreUnavailable):  # the claim then expires on its own
                await self._idempotency.release(self.message_id)
        await self.message.reject(requeue=requeue)


class PatternReader:
    """What every reader of the bridge's events shares: the exchange and binding patterns."""

    def __init__(self, exchange: str, patterns: Sequence[str]) -> None:
        if isinstance(patterns, str) or not patterns:
            raise ValueError("patterns must be a non-empty list of binding patterns")
        self._exchange = exchange
        self._patterns = tuple(patterns)

    @property
    def exchange(self) -> str:
        return self._exchange

    @property
    def patterns(self) -> tuple[str, ...]:
        return self._patterns


class EventConsumer(PatternReader):
    """A queue bound to the bridge's exchange, yielding typed events.

    ``queue`` names a durable queue that keeps events while no consumer runs;
    without it the queue is temporary (exclusive, deleted on disconnect).
    ``quorum=True`` makes the named queue a replicated quorum queue, recommended
    in production. ``dead_letter_exchange`` is declared (durable fanout,
    with a durable queue of the same name) and receives every rejected message.
    ``verify_secrets`` (the ``whsec_`` secrets OpenAI signs with) re-checks each
    message's original signature, so events published by anyone else are
    refused. ``idempotency`` skips a ``message_id`` already handled, and hands a
    message whose id another replica is handling back to the queue after
    ``busy_retry_seconds``.
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
        verify_secrets: Sequence[str] = (),
        idempotency: IdempotencyStore | None = None,
        busy_retry_seconds: float = 1.0,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(exchange, patterns)
        if isinstance(verify_secrets, str):
            raise ValueError("verify_secrets must be a list of secrets, not one string")
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        if quorum and not queue:
            raise ValueError("a quorum queue needs a name: quorum queues are durable and shared")
        self._amqp_url = amqp_url
        self._queue_name = queue
        self._prefetch = prefetch
        self._quorum = quorum
        self._dead_letter_exchange = dead_letter_exchange
        self._verifier = stored_message_verifier(verify_secrets)
        self._idempotency = idempotency
        self._busy_retry_seconds = busy_retry_seconds
        self._requeues: set[asyncio.Task[None]] = set()
        self._timeout = timeout
        self._connection: AbstractRobustConnection | None = None
        self._queue: AbstractQueue | None = None
        self._stream: AsyncGenerator[Delivery, None] | None = None
        self._spans: SpanFactory | None = None

    @property
    def queue_name(self) -> str:
        return self._open_queue().name

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as on_failure:
            async with asyncio.timeout(self._timeout):
                connection = await connect_to_a_node(
                    self._amqp_url, aio_pika.connect_robust, attempt_seconds=self._timeout
                )
                on_failure.push_async_callback(connection.close)
                await _require_exchange(connection, self._exchange)
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=self._prefetch)
                self._queue = await self._declare_queue(channel)
            self._spans = _consumer_spans(self._queue.name)
            self._connection = connection
            on_failure.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for requeue in self._requeues:
            requeue.cancel()  # closing the channel returns their messages to the queue
        connection, stream = self._connection, self._stream
        self._connection, self._queue, self._stream = None, None, None
        await close_deliveries(stream, connection, self._timeout)

    def __aiter__(self) -> AsyncIterator[Delivery]:
        # One stream per consumer: a loop left with `break` and a later loop share it,
        # instead of a forgotten broker-side consumer holding prefetched messages.
        if self._stream is None:
            self._stream = self._deliveries(self._open_queue())
        return self._stream

    async def run(self, handler: Handler) -> None:
        """Call ``handler`` with each event until cancelled.

        A handler that returns acknowledges the message; one that raises rejects it
        (to the dead-letter exchange, if any) and the loop goes on with the next.
        Each handler runs inside the message's trace context: ``current_trace()`` of
        :mod:`bridge.tracing` returns it, and with OpenTelemetry's API installed a
        consumer span continues the webhook request's trace.
        """
        async for delivery in self:
            settle: Callable[[], Awaitable[None]]
            try:
                with handling(delivery.trace, self._spans):
                    await handler(delivery.event)
            except Exception:
                logger.exception(
                    "handler failed; rejecting the message",
                    extra={"message_id": delivery.message_id, "routing_key": delivery.routing_key},
                )
                settle = delivery.reject
            else:
                settle = delivery.ack
            try:
                await settle()
            except aiormq.exceptions.ChannelInvalidStateError:
                # The connection dropped with this delivery unsettled: the broker hands
                # it out again after the robust connection is back, so carry on.
                logger.warning(
                    "connection lost before settling; the broker will redeliver",
                    extra={"message_id": delivery.message_id},
                )

    def _open_queue(self) -> AbstractQueue:
        if self._queue is None:
            raise RuntimeError("use the consumer inside 'async with'")
        return self._queue

    async def _declare_queue(self, channel: AbstractRobustChannel) -> AbstractQueue:
        arguments: dict[str, aiormq.abc.FieldValue] = {}
        if self._quorum:
            arguments["x-queue-type"] = "quorum"
        if self._dead_letter_exchange:
            arguments["x-dead-letter-exchange"] = self._dead_letter_exchange
            await self._declare_dead_letters(channel, self._dead_letter_exchange)
        named = self._queue_name is not None
        queue = await channel.declare_queue(
            self._queue_name,
            durable=named,
            exclusive=not named,
            auto_delete=not named,
            arguments=arguments,
        )
        for pattern in self._patterns:
            await queue.bind(self._exchange, routing_key=pattern)
        return queue

    async def _declare_dead_letters(self, channel: AbstractRobustChannel, name: str) -> None:
        # Without a queue behind it, a dead-letter exchange silently discards what it receives.
        exchange = await channel.declare_exchange(name, ExchangeType.FANOUT, durable=True)
        arguments: dict[str, aiormq.abc.FieldValue] = (
            {"x-queue-type": "quorum"} if self._quorum else {}
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
                logger.warning(
                    "rejecting a message that fails signature verification",
                    extra={**context, "reason": problem},
                )
                await message.reject(requeue=False)
                return None
        try:
            event = parse_event(message.body)
        except ValidationError as error:
            logger.warning(
                "rejecting a message that is not a webhook event",
                extra={**context, "reason": _first_problem(error)},
            )
            await message.reject(requeue=False)
            return None
        if self._idempotency is None or message.message_id is None:
            return Delivery(event, message)
        try:
            state = await self._idempotency.claim(message.message_id)
        except StoreUnavailable as error:
            logger.warning(
                "idempotency store unavailable; the message goes back to the queue",
                extra={**context, "reason": str(error)},
            )
            state = ClaimState.IN_FLIGHT
        if state is ClaimState.CONFIRMED:
            logger.info("skipping a message already handled", extra=context)
            await message.ack()
            return None
        if state is ClaimState.IN_FLIGHT:
            self._requeue_later(message)
            return None
        return Delivery(event, message, self._idempotency)

    def _requeue_later(self, message: AbstractIncomingMessage) -> None:
        """Hand ``message`` back after a pause, by when its other copy is done or released."""

        async def requeue() -> None:
            await asyncio.sleep(self._busy_retry_seconds)
            with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError):
                await message.reject(requeue=True)

        task = asyncio.get_running_loop().create_task(requeue())
        self._requeues.add(task)
        task.add_done_callback(self._requeues.discard)


async def _require_exchange(connection: AbstractRobustConnection, name: str) -> None:
    # A failed passive declare closes its channel, so it gets one of its own.
    async with connection.channel() as probe:
        try:
            await probe.declare_exchange(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise ExchangeNotFoundError(name) from None


def stored_message_verifier(secrets: Sequence[str]) -> SignatureVerifier | None:
    """A verifier for stored messages (no timestamp window), or ``None`` without secrets."""
    if not secrets:
        return None
    keys = [decode_secret(secret) for secret in secrets]
    return SignatureVerifier(keys, tolerance_seconds=_ANY_AGE)


async def close_deliveries(
    stream: AsyncGenerator[Delivery, None] | None,
    connection: AbstractConnection | None,
    close_timeout: float,
) -> None:
    """End a consumer's delivery stream, then its connection (which returns, or for a
    stream forgets, every unacknowledged message)."""
    try:
        if stream is not None:
            await stream.aclose()
    finally:
        if connection is not None:
            async with asyncio.timeout(close_timeout):
                await connection.close()


def signature_problem(verifier: SignatureVerifier, message: AbstractIncomingMessage) -> str | None:
    """Why the message is not what OpenAI signed, or ``None`` when it is."""
    text_headers = {
        name: value for name, value in message.headers.items() if isinstance(value, str)
    }
    try:
        headers = WebhookHeaders.from_mapping(text_headers)
        verifier.verify(headers, message.body)
    except WebhookVerificationError as error:
        return str(error)
    # Idempotency keys on message_id, so it must be the id the signature covers.
    if message.message_id != headers.webhook_id:
        return "message_id is not the signed webhook-id"
    return None


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
