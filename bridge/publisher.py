"""Publishing verified webhooks to RabbitMQ with publisher confirms.

One aio-pika connection per process, to one node of the configured cluster at a
time, one confirming channel for publishes, and short-lived channels for
declaring or checking the topology (a failed passive declare closes its channel,
which must never be the publishing one). A supervisor task reconnects, failing
over to the other nodes in turn with backoff and jitter; it re-resolves host
names on every attempt. While it does, publishes fail at once (503) instead of
waiting. Every broker await is bounded by one outer ``asyncio.timeout``.

The hot path writes pre-encoded frames (:mod:`bridge.frames`) through the aiormq
channel underneath aio-pika, registering each confirmation where aiormq's own
``basic_publish`` would, so aiormq still resolves acks, nacks and returns. The
publishes of one event-loop turn go to the socket in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, ExchangeType
from aiormq.abc import ChannelFrame
from pamqp.common import FieldTable

from bridge.deadlines import Deadlines
from bridge.events import Classified
from bridge.frames import APP_ID, HeaderValue, MessageProperties, encode_publish
from bridge.limiter import AdaptiveLimit
from bridge.nodes import (
    BrokerNodes,
    backoff,
    describe,
    first_answering,
    node_address,
    retrieve_outcome,
    with_heartbeat,
    within,
)
from bridge.settings import QueueType, Settings, redact_url
from bridge.signature import WebhookHeaders
from bridge.sources import SOURCE_HEADER, source_exchange_name
from bridge.tracing import TraceContext, new_trace

logger = logging.getLogger(__name__)

VALIDATED_HEADER = "x-event-validated"
QUARANTINE_REASON_HEADER = "x-quarantine-reason"
ALL_EVENTS = "#"
# The AMQP timestamp is 64 bits of seconds, but pamqp (aiormq, aio-pika) reads values
# past 2**32 - 1 as milliseconds: such a created_at is left out rather than misread.
_MAX_AMQP_TIMESTAMP = 2**32 - 1
INITIAL_PUBLISHES_IN_FLIGHT = 32
_EXISTING_QUEUE_TYPE = re.compile(r"current is (?:the value )?'([a-z]+)'")


class Outcome(enum.StrEnum):
    PUBLISHED = "published"
    UNROUTED = "unrouted"
    QUARANTINED = "quarantined"


class BrokerUnavailable(Exception):
    """The broker did not confirm in time: the webhook must be retried by its sender."""


class Publisher(Protocol):
    """What the HTTP app needs from a broker."""

    @property
    def ready(self) -> bool: ...

    @property
    def connected(self) -> bool: ...

    async def publish(self, message: OutgoingMessage) -> Outcome: ...


@dataclass(frozen=True, slots=True)
class Topology:
    """The exchanges and queues the bridge publishes through.

    With sources (``BRIDGE_SOURCES``) each source also has a topic exchange of its own,
    ``<exchange>.source.<name>``, fed by the headers exchange ``<exchange>.sources`` on the
    message's ``x-webhook-source``. Without the archive the main exchange feeds that headers
    exchange with ``#``: every event then has a route, so the main exchange's alternate
    exchange never fires, and an event that no queue received anywhere comes back as a
    mandatory return, which the publisher stores in the unrouted queue. (An alternate
    exchange fires per exchange, when that exchange's own bindings match nothing: it
    cannot tell whether a source exchange's queue took the event.)

    With the archive, the stream takes every event, so nothing ever comes back: the fanout
    ingress feeds the stream, the main exchange (which keeps its alternate exchange) and
    the headers exchange. The unrouted queue then holds what no queue bound to the main
    exchange received, which includes events only a source exchange's queues received.
    """

    exchange: str
    unrouted_exchange: str
    quarantine_exchange: str
    queue_type: QueueType = "quorum"
    archive: ArchiveRetention | None = None
    sources: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        return cls(
            settings.exchange,
            settings.unrouted_exchange,
            settings.quarantine_exchange,
            settings.queue_type,
            ArchiveRetention.from_settings(settings),
            settings.sources,
        )

    def source_exchange(self, source: str) -> str:
        """The topic exchange of one source's events, by event type."""
        return source_exchange_name(self.exchange, source)

    @property
    def sources_exchange(self) -> str:
        """The headers exchange that hands each event to its source's exchange."""
        return f"{self.exchange}.sources"

    @property
    def ingress_exchange(self) -> str:
        """With the archive on, the fanout exchange events enter by: it feeds the archive
        stream and the topic exchange, which keeps its alternate exchange working."""
        return f"{self.exchange}.ingress"

    @property
    def archive_stream(self) -> str:
        return f"{self.exchange}.archive"

    @property
    def entry_exchange(self) -> str:
        """Where the bridge publishes authentic, well-formed events."""
        return self.exchange if self.archive is None else self.ingress_exchange


@dataclass(frozen=True, slots=True)
class ArchiveRetention:
    """How long, or how many bytes, the archive stream keeps (at least one is set)."""

    max_age: str = ""
    max_bytes: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ArchiveRetention | None:
        if not settings.archive_enabled:
            return None
        return cls(settings.archive_max_age, settings.archive_max_bytes)

    @property
    def stream_arguments(self) -> FieldTable:
        arguments: FieldTable = {"x-queue-type": "stream"}
        if self.max_age:
            arguments["x-max-age"] = self.max_age
        if self.max_bytes is not None:
            arguments["x-max-length-bytes"] = self.max_bytes
        return arguments


@dataclass(slots=True)  # built per request: a frozen one costs five times as much
class OutgoingMessage:
    """The exact request bytes plus where they go and what travels with them."""

    body: bytes
    exchange: str
    routing_key: str
    quarantined: bool
    properties: MessageProperties

    def frames(
        self, *, channel: int, max_body_frame_size: int, exchange: str | None = None
    ) -> bytes:
        """The AMQP frames publishing this message (to ``exchange`` instead, if given)."""
        return encode_publish(
            channel=channel,
            exchange=self.exchange if exchange is None else exchange,
            routing_key=self.routing_key,
            properties=self.properties,
            body=self.body,
            max_body_frame_size=max_body_frame_size,
        )


def route(
    topology: Topology,
    headers: WebhookHeaders,
    body: bytes,
    event: Classified,
    trace: TraceContext | None = None,
    *,
    source: str | None = None,
) -> OutgoingMessage:
    """Apply the routing policy: nothing authentic is dropped, nothing malformed is routed.

    Every message carries a W3C ``traceparent``: ``trace``'s, or a new trace's, and with
    sources the ``x-webhook-source`` it came from.
    """
    amqp_headers: dict[str, HeaderValue] = {
        "webhook-id": headers.webhook_id,
        "webhook-signature": headers.signature,
        "webhook-timestamp": headers.timestamp,
    }
    if source is not None:
        amqp_headers[SOURCE_HEADER] = source
    amqp_headers.update((trace or new_trace()).headers())
    if event.kind == "malformed":
        amqp_headers[QUARANTINE_REASON_HEADER] = event.reason or "malformed"
        exchange, routing_key = topology.quarantine_exchange, ""
    else:
        amqp_headers[VALIDATED_HEADER] = event.kind == "known"
        exchange, routing_key = topology.entry_exchange, event.event_type or ""
    created_at = event.created_at if event.created_at is not None else int(headers.timestamp)
    properties = MessageProperties(
        message_id=headers.webhook_id,
        headers=amqp_headers,
        message_type=event.event_type,
        timestamp=created_at if 0 <= created_at <= _MAX_AMQP_TIMESTAMP else None,
    )
    return OutgoingMessage(body, exchange, routing_key, event.kind == "malformed", properties)


class AmqpPublisher:
    """The broker side of the bridge, kept connected by a supervisor task.

    ``ready`` is true only while the connection and channel are open, the
    topology is in place and the broker answers: a publish that timed out marks
    the path stalled (requests then get 503 at once) until a confirm or a probe
    round trip comes back. A broker under a memory or disk alarm stops reading
    from publishing connections, so this is how a blocked broker shows up in
    ``/readyz``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        supervise_interval: float = 1.0,
        on_connect: Callable[[str, bool], None] | None = None,
        on_limit_change: Callable[[int], None] = lambda _limit: None,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._topology = Topology.from_settings(settings)
        self._timeout = settings.publish_timeout
        self._supervise_interval = supervise_interval
        self._rng = rng or random.Random()  # noqa: S311  # jitter and spreading, not secrets
        self._nodes = BrokerNodes(settings.amqp_urls, self._rng)
        self._on_connect = on_connect
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._amqp_channel: aiormq.Channel | None = None
        self._awaiting_confirms: set[asyncio.Future[Any]] = set()
        """The confirmations ``_amqp_channel`` owes: cancelled all at once when it closes."""
        self._pending_channel: aiormq.Channel | None = None
        self._pending_frames: list[bytes] = []
        self._flush_scheduled = False
        self.in_flight_limit = AdaptiveLimit(
            initial=INITIAL_PUBLISHES_IN_FLIGHT,
            minimum=settings.min_publishes_in_flight,
            maximum=settings.max_publishes_in_flight,
            on_change=on_limit_change,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._topology_ok = False
        self._declared = False
        self._stalled = False
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing_connections: set[asyncio.Future[None]] = set()
        self.failed = asyncio.Event()
        """Set when the broker's state needs an operator (see :class:`TopologyConflict`)."""

    @property
    def topology(self) -> Topology:
        return self._topology

    @property
    def connected(self) -> bool:
        connection = self._connection
        return connection is not None and not connection.is_closed and connection.connected.is_set()

    @property
    def node(self) -> str | None:
        """``host:port`` of the node this process is connected to, if any."""
        return self._nodes.current if self.connected else None

    @property
    def ready(self) -> bool:
        channel = self._channel
        return (
            self.connected
            and channel is not None
            and not channel.is_closed
            and self._topology_ok
            and not self._stalled
        )

    async def start(self) -> None:
        """Begin connecting in the background; ``ready`` turns true once it succeeds."""
        self._loop = asyncio.get_running_loop()
        self._confirm_deadlines = Deadlines(self._loop)
        self._supervisor = asyncio.create_task(self._supervise(), name="amqp-supervisor")

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._drop_connection(wait=self._timeout)

    async def publish(self, message: OutgoingMessage) -> Outcome:
        if not self.ready:
            raise BrokerUnavailable(self._not_ready_reason())
        loop = self._loop
        assert loop is not None
        started = loop.time()
        # One deadline for the whole publish, waiting for a slot included: timers of the
        # loop's own, cheaper on this path than an asyncio.timeout each.
        deadline = started + self._timeout
        limit = self.in_flight_limit
        try:
            if not limit.try_acquire():
                await limit.wait(loop, deadline)
            holding_since = loop.time()
            held: float | None = None
            try:
                channel = await self._publishing_channel(deadline)
                try:
                    await self._confirmed(channel, message, message.exchange, deadline)
                    outcome = Outcome.QUARANTINED if message.quarantined else Outcome.PUBLISHED
                except aiormq.exceptions.PublishError:
                    if message.quarantined:
                        raise
                    # No queue received it: with sources that is how an unrouted event shows
                    # (see Topology); without, the alternate-exchange link is missing (e.g.
                    # operator-managed topology). Either way, store it directly.
                    await self._confirmed(
                        channel, message, self._topology.unrouted_exchange, deadline
                    )
                    outcome = Outcome.UNROUTED
                held = loop.time() - holding_since
                return outcome
            except TimeoutError:
                limit.timed_out()
                raise
            finally:
                limit.release(held)
        except TimeoutError:
            self._stalled = True
            self._wake.set()
            raise BrokerUnavailable(
                f"no broker confirm within {self._timeout:g} s "
                f"(waited {loop.time() - started:.1f} s)"
            ) from None
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
            raise BrokerUnavailable(f"broker refused or lost the publish: {error!r}") from None

    def _not_ready_reason(self) -> str:
        if not self.connected:
            return "not connected to the broker"
        if not self._topology_ok:
            return "broker topology is not in place"
        if self._stalled:
            return "broker is not confirming publishes (blocked or overloaded)"
        return "publishing channel is closed"

    async def _publishing_channel(self, deadline: float) -> aiormq.Channel:
        channel = self._amqp_channel
        if channel is None or channel.is_closed:
            publishing = self._channel
            if publishing is None or publishing.is_closed:
                # The connection went while this publish waited for its slot: the same
                # answer as a publish that arrives after it went.
                raise BrokerUnavailable(self._not_ready_reason())
            async with asyncio.timeout_at(deadline):
                underlay = await publishing.get_underlay_channel()
            if not isinstance(underlay, aiormq.Channel):
                raise RuntimeError(f"unexpected AMQP channel type {type(underlay).__name__}")
            awaiting: set[asyncio.Future[Any]] = set()
            underlay.closing.add_done_callback(lambda _closing: _cancel_all(awaiting))
            channel = self._amqp_channel = underlay
            self._awaiting_confirms = awaiting
        return channel

    async def _confirmed(
        self, channel: aiormq.Channel, message: OutgoingMessage, exchange: str, deadline: float
    ) -> None:
        """Publish on ``channel`` and wait for the broker's ack (aiormq raises on nack/return)
        until ``deadline``, then raise TimeoutError."""
        if channel is not self._amqp_channel or channel.is_closed:
            raise BrokerUnavailable("the publishing channel closed")
        frames = message.frames(
            channel=channel.number, max_body_frame_size=channel.max_content_size, exchange=exchange
        )
        # The same bookkeeping as aiormq's basic_publish: its frame reader resolves
        # confirmations by delivery tag, and returned messages by message_id. The future
        # is a plain one, not aiormq's (which costs three callbacks per publish to track):
        # the channel's closing cancels what it still owes, through the set below.
        channel.delivery_tag += 1
        delivery_tag = channel.delivery_tag
        confirmation = _Confirmation(loop=channel.loop)
        awaiting = self._awaiting_confirms
        awaiting.add(confirmation)
        channel.confirmations[delivery_tag] = confirmation
        message_id = message.properties.message_id
        channel.message_id_delivery_tag[message_id] = delivery_tag
        self._write_soon(channel, frames)
        # Cancelled, not failed, at the deadline: aiormq then ignores a late ack quietly.
        self._confirm_deadlines.cancel_at(deadline, confirmation)
        loop = channel.loop
        try:
            await confirmation
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not confirmation.cancelled() or (task is not None and task.cancelling()):
                raise
            if loop.time() >= deadline and not channel.is_closed:
                raise TimeoutError from None
            raise BrokerUnavailable("the publishing channel closed") from None
        finally:
            awaiting.discard(confirmation)
            if channel.message_id_delivery_tag.get(message_id) == delivery_tag:
                del channel.message_id_delivery_tag[message_id]
        self._stalled = False

    def _write_soon(self, channel: aiormq.Channel, frames: bytes) -> None:
        """Queue frames for the socket, joined with the rest of this loop turn's publishes."""
        if self._pending_channel is not channel:
            self._flush_pending()
            self._pending_channel = channel
        self._pending_frames.append(frames)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            channel.loop.call_soon(self._flush_pending)

    def _flush_pending(self) -> None:
        self._flush_scheduled = False
        channel = self._pending_channel
        if channel is None or not self._pending_frames:
            return
        try:
            channel.write_queue.put_nowait(
                ChannelFrame(payload=b"".join(self._pending_frames), should_close=False)
            )
        except asyncio.QueueFull:
            # aiormq's writer is behind: keep the frames, in order, for the next turn.
            self._flush_scheduled = True
            channel.loop.call_soon(self._flush_pending)
            return
        self._pending_frames.clear()

    async def _supervise(self) -> None:
        failures = 0
        last_problem = ""
        while True:
            wait = self._supervise_interval
            try:
                if not self.connected:
                    await self._connect()
                if self._channel is None or self._channel.is_closed:
                    await self._open_channel()
                if not self._topology_ok:
                    await self._ensure_topology()
                if self._stalled:
                    await self._probe_broker()
                failures, last_problem = 0, ""
            except asyncio.CancelledError:
                raise
            except TopologyConflict as conflict:
                logger.error("cannot start: %s", conflict)
                self.failed.set()
                return
            except Exception as error:  # any failure here means "not ready yet"
                problem = describe(error)
                if problem != last_problem:
                    logger.warning("broker not ready: %s", problem)
                failures, last_problem = failures + 1, problem
                wait = backoff(failures, self._rng)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _connect(self) -> None:
        """Connect to the first node of this round that answers; raise if none does."""
        await self._drop_connection()
        url, connection = await first_answering(
            self._nodes,
            lambda url: aio_pika.connect(
                with_heartbeat(url, self._settings.amqp_heartbeat),
                ssl_context=self._settings.amqp_ssl_context(url),
                client_properties={"connection_name": APP_ID},
                timeout=self._timeout,
            ),
            attempt_seconds=self._timeout,
        )
        connection.close_callbacks.add(self._on_connection_lost)
        self._connection = connection
        node = node_address(url)
        reconnect = self._nodes.connected_to(url)
        logger.info(
            "%s broker node %s (%s)",
            "reconnected to" if reconnect else "connected to",
            node,
            redact_url(url),
        )
        if self._on_connect is not None:
            self._on_connect(node, reconnect)

    async def _drop_connection(self, *, wait: float = 0.0) -> None:
        """Forget the current connection and close it in the background, waiting for that
        at most ``wait`` seconds: closing towards a frozen node can take minutes (unsent
        data, no Close-Ok), and no failover may wait for it."""
        connection, self._connection = self._connection, None
        self._channel = self._amqp_channel = None
        self._topology_ok = False
        self._stalled = False
        if connection is None or connection.is_closed:
            return
        closing = asyncio.ensure_future(connection.close())
        self._closing_connections.add(closing)
        closing.add_done_callback(_forget_closed(self._closing_connections))
        if wait > 0:
            await asyncio.wait({closing}, timeout=wait)

    async def _open_channel(self) -> None:
        assert self._connection is not None
        channel = self._connection.channel(publisher_confirms=True, on_return_raises=True)
        await within(self._timeout, channel.initialize())
        channel.close_callbacks.add(self._on_channel_closed)
        self._channel, self._amqp_channel = channel, None

    def _on_connection_lost(self, connection: object, _error: object = None) -> None:
        if connection is not self._connection:
            return
        self._topology_ok = False
        self._wake.set()
        if not self._closing:
            logger.warning(
                "lost the connection to broker node %s; failing over", self._nodes.current
            )
            self._nodes.lost_current()

    def _on_channel_closed(self, channel: object, _error: object = None) -> None:
        if channel is self._channel and not self._closing:
            # A channel closed by the broker (e.g. a deleted exchange) needs the topology again.
            self._topology_ok = False
            self._wake.set()

    async def _ensure_topology(self) -> None:
        """Declare the topology on the first connection, and after that only check it,
        declaring again only if something went missing.

        A passive check reads the node's own copy of the metadata, so it answers even
        while a frozen node holds up every cluster-wide change until the other nodes
        declare it down (``net_ticktime``).
        """
        declare = self._settings.declare_topology and not self._declared
        if not declare:
            try:
                await self._on_new_channel(check_topology)
            except RuntimeError:
                if not self._settings.declare_topology:
                    raise
                declare = True
        if declare:
            await self._on_new_channel(declare_topology)
            self._declared = True
        self._topology_ok = True
        logger.info(
            "topology %s: exchange %s, unrouted %s, quarantine %s, archive %s",
            "declared" if declare else "checked",
            self._topology.exchange,
            self._topology.unrouted_exchange,
            self._topology.quarantine_exchange,
            "off" if self._topology.archive is None else self._topology.archive_stream,
        )
        if self._topology.sources:
            logger.info(
                "sources %s: exchanges %s",
                ", ".join(self._topology.sources),
                ", ".join(map(self._topology.source_exchange, self._topology.sources)),
            )

    async def _on_new_channel(
        self, step: Callable[[AbstractChannel, Topology], Awaitable[None]]
    ) -> None:
        """Run ``step`` on a short-lived channel, all of it (the close too) within the deadline."""
        assert self._connection is not None
        connection, topology = self._connection, self._topology

        async def on_channel() -> None:
            async with connection.channel() as channel:
                await step(channel, topology)

        await within(self._timeout, on_channel())

    async def _probe_broker(self) -> None:
        """A round trip on the publishing connection: it stalls exactly while the broker
        blocks that connection, and needs no permission beyond what publishing needs."""
        await self._on_new_channel(_declare_exchange_passively)
        self._stalled = False
        logger.info("broker answers again")


class _Confirmation(asyncio.Future[Any]):
    """A publish's confirmation, which an answer coming after it was given up leaves alone.

    aiormq's reader settles it on an ack, a nack or a basic.return without asking whether
    it is still pending. One given up (its deadline passed, or its request was cancelled)
    a loop turn before a return for it was read would otherwise raise InvalidStateError
    in that reader, and close the channel under every other publish in flight.
    """

    def set_result(self, result: Any) -> None:
        if not self.done():
            super().set_result(result)

    def set_exception(self, exception: type | BaseException) -> None:
        if not self.done():
            super().set_exception(exception)


def _cancel_all(futures: set[asyncio.Future[Any]]) -> None:
    for future in futures:
        future.cancel()


async def _declare_exchange_passively(channel: AbstractChannel, topology: Topology) -> None:
    await channel.declare_exchange(topology.exchange, passive=True)


def _forget_closed(pending: set[asyncio.Future[None]]) -> Callable[[asyncio.Future[None]], None]:
    def forget(closing: asyncio.Future[None]) -> None:
        pending.discard(closing)
        retrieve_outcome(closing)  # a failed close of a lost connection is expected

    return forget


class TopologyConflict(Exception):
    """A queue the bridge owns exists with another type: only an operator can resolve it."""


async def declare_topology(channel: aio_pika.abc.AbstractChannel, topology: Topology) -> None:
    """Declare the exchanges and queues the bridge publishes to, all durable."""
    for name in (topology.unrouted_exchange, topology.quarantine_exchange):
        exchange = await channel.declare_exchange(name, ExchangeType.FANOUT, durable=True)
        queue = await _declare_owned_queue(channel, name, topology.queue_type)
        await queue.bind(exchange)
    main = await channel.declare_exchange(
        topology.exchange,
        ExchangeType.TOPIC,
        durable=True,
        arguments={"alternate-exchange": topology.unrouted_exchange},
    )
    ingress = None
    if topology.archive is not None:
        ingress = await _declare_archive(channel, topology, topology.archive, main)
    if topology.sources:
        await _declare_sources(channel, topology, main, ingress)


SOURCE_MATCH = "all-with-x"
"""A headers binding that matches on an ``x-`` header (RabbitMQ 3.10 and later): with
plain ``all`` RabbitMQ leaves ``x-`` arguments out, and the binding would match everything."""


def source_binding(source: str) -> FieldTable:
    """The arguments binding a source's exchange to the headers exchange."""
    return {"x-match": SOURCE_MATCH, SOURCE_HEADER: source}


async def _declare_sources(
    channel: aio_pika.abc.AbstractChannel,
    topology: Topology,
    main: aio_pika.abc.AbstractExchange,
    ingress: aio_pika.abc.AbstractExchange | None,
) -> None:
    """Each source's topic exchange, behind the headers exchange that picks it (see
    :class:`Topology` for where that is fed from, with and without the archive)."""
    by_source = await channel.declare_exchange(
        topology.sources_exchange, ExchangeType.HEADERS, durable=True
    )
    for source in topology.sources:
        exchange = await channel.declare_exchange(
            topology.source_exchange(source), ExchangeType.TOPIC, durable=True
        )
        await exchange.bind(by_source, arguments=source_binding(source))
    if ingress is None:
        await by_source.bind(main, routing_key=ALL_EVENTS)
    else:
        # Fed by the main exchange too, it would take every event twice, and the main
        # exchange's alternate exchange would never fire.
        await by_source.unbind(main, routing_key=ALL_EVENTS)
        await by_source.bind(ingress)


async def _declare_archive(
    channel: aio_pika.abc.AbstractChannel,
    topology: Topology,
    retention: ArchiveRetention,
    main: aio_pika.abc.AbstractExchange,
) -> aio_pika.abc.AbstractExchange:
    """The archive stream, fed by the ingress exchange and by the quarantine exchange.

    A stream bound to the topic exchange itself would count as a route for every event,
    and the alternate exchange would never see one: hence the fanout ingress in front.
    """
    ingress = await channel.declare_exchange(
        topology.ingress_exchange, ExchangeType.FANOUT, durable=True
    )
    await main.bind(ingress)
    try:
        stream = await channel.declare_queue(
            topology.archive_stream, durable=True, arguments=retention.stream_arguments
        )
    except aiormq.exceptions.ChannelPreconditionFailed as error:
        raise TopologyConflict(
            f"the archive stream {topology.archive_stream!r} exists with other arguments "
            f"({error}); RabbitMQ cannot change them on a declare: apply the new retention "
            "with a policy (max-age, max-length-bytes), or delete the stream"
        ) from None
    await stream.bind(ingress)
    await stream.bind(topology.quarantine_exchange)
    return ingress


async def check_topology(channel: aio_pika.abc.AbstractChannel, topology: Topology) -> None:
    """Passively check that operator-managed exchanges exist (raises if one does not)."""
    names = [topology.exchange, topology.unrouted_exchange, topology.quarantine_exchange]
    if topology.archive is not None:
        names.append(topology.ingress_exchange)
    if topology.sources:
        names.append(topology.sources_exchange)
        names.extend(topology.source_exchange(source) for source in topology.sources)
    for name in names:
        with declared_elsewhere("exchange", name):
            await channel.declare_exchange(name, passive=True)


@contextlib.contextmanager
def declared_elsewhere(kind: str, name: str) -> Iterator[None]:
    """Around a passive declare of ``name`` (an exchange or a queue): its absence becomes
    the one line telling the operator what to do."""
    try:
        yield
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise RuntimeError(
            f"{kind} {name!r} does not exist and BRIDGE_DECLARE_TOPOLOGY is false; "
            "load the broker definitions or enable declaration"
        ) from None


async def _declare_owned_queue(
    channel: aio_pika.abc.AbstractChannel, name: str, queue_type: QueueType
) -> aio_pika.abc.AbstractQueue:
    try:
        return await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": queue_type}
        )
    except aiormq.exceptions.ChannelPreconditionFailed as error:
        if "'x-queue-type'" not in str(error):
            raise
        existing = _EXISTING_QUEUE_TYPE.search(str(error))
        raise TopologyConflict(
            f"queue {name!r} exists as a {existing.group(1) if existing else 'classic'} queue "
            f"but BRIDGE_QUEUE_TYPE is {queue_type}; RabbitMQ cannot change a queue's type: "
            f"move its messages elsewhere and delete it, or set BRIDGE_QUEUE_TYPE to its type"
        ) from None
