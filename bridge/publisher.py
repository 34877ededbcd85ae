"""Publishing verified webhooks to RabbitMQ with publisher confirms.

One robust aio-pika connection per process, one confirming channel for
publishes, and short-lived channels for declaring or checking the topology (a
failed passive declare closes its channel, which must never be the publishing
one). Every broker await is bounded by one outer ``asyncio.timeout``, which also
covers waiting for a robust connection to come back (``publish(timeout=)`` does
not).

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
import time
from dataclasses import dataclass
from typing import Protocol

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection, ExchangeType
from aiormq.abc import ChannelFrame

from bridge.events import Classified
from bridge.frames import APP_ID, HeaderValue, MessageProperties, encode_publish
from bridge.settings import Settings
from bridge.signature import WebhookHeaders

logger = logging.getLogger(__name__)

VALIDATED_HEADER = "x-event-validated"
QUARANTINE_REASON_HEADER = "x-quarantine-reason"
MAX_RETRY_INTERVAL = 5.0
RECONNECT_INTERVAL = 1.0
_MAX_AMQP_TIMESTAMP = 2**63 - 1


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
    exchange: str
    unrouted_exchange: str
    quarantine_exchange: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        return cls(settings.exchange, settings.unrouted_exchange, settings.quarantine_exchange)


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """The exact request bytes plus where they go and what travels with them."""

    body: bytes
    exchange: str
    routing_key: str
    quarantined: bool
    properties: MessageProperties


def route(
    topology: Topology, headers: WebhookHeaders, body: bytes, event: Classified
) -> OutgoingMessage:
    """Apply the routing policy: nothing authentic is dropped, nothing malformed is routed."""
    amqp_headers: dict[str, HeaderValue] = {
        "webhook-id": headers.webhook_id,
        "webhook-signature": headers.signature,
        "webhook-timestamp": headers.timestamp,
    }
    if event.kind == "malformed":
        amqp_headers[QUARANTINE_REASON_HEADER] = event.reason or "malformed"
        exchange, routing_key = topology.quarantine_exchange, ""
    else:
        amqp_headers[VALIDATED_HEADER] = event.kind == "known"
        exchange, routing_key = topology.exchange, event.event_type or ""
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
    ) -> None:
        self._settings = settings
        self._topology = Topology.from_settings(settings)
        self._timeout = settings.publish_timeout
        self._supervise_interval = supervise_interval
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._amqp_channel: aiormq.Channel | None = None
        self._pending_channel: aiormq.Channel | None = None
        self._pending_frames: list[bytes] = []
        self._flush_scheduled = False
        # Beyond a few dozen unconfirmed publishes the broker only queues them, and its
        # flow control then stalls them all at once: waiting here instead, in order,
        # keeps the slowest requests fast (the benchmark measures this).
        self._in_flight_limit = asyncio.Semaphore(settings.max_publishes_in_flight)
        self._topology_ok = False
        self._stalled = False
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def topology(self) -> Topology:
        return self._topology

    @property
    def connected(self) -> bool:
        connection = self._connection
        return connection is not None and not connection.is_closed and connection.connected.is_set()

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
        self._supervisor = asyncio.create_task(self._supervise(), name="amqp-supervisor")

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._connection is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout):
                    await self._connection.close()

    async def publish(self, message: OutgoingMessage) -> Outcome:
        if not self.ready:
            raise BrokerUnavailable(self._not_ready_reason())
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._timeout), self._in_flight_limit:
                channel = await self._publishing_channel()
                try:
                    await self._confirmed(channel, message, message.exchange)
                    return Outcome.QUARANTINED if message.quarantined else Outcome.PUBLISHED
                except aiormq.exceptions.PublishError:
                    if message.quarantined:
                        raise
                # Returned even via the alternate exchange: the alternate-exchange
                # link is missing (e.g. operator-managed topology), so store it directly.
                await self._confirmed(channel, message, self._topology.unrouted_exchange)
                return Outcome.UNROUTED
        except TimeoutError:
            self._stalled = True
            self._wake.set()
            raise BrokerUnavailable(
                f"no broker confirm within {self._timeout:g} s "
                f"(waited {time.monotonic() - started:.1f} s)"
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

    async def _publishing_channel(self) -> aiormq.Channel:
        channel = self._amqp_channel
        if channel is None or channel.is_closed:
            assert self._channel is not None
            underlay = await self._channel.get_underlay_channel()
            if not isinstance(underlay, aiormq.Channel):
                raise RuntimeError(f"unexpected AMQP channel type {type(underlay).__name__}")
            channel = self._amqp_channel = underlay
        return channel

    async def _confirmed(
        self, channel: aiormq.Channel, message: OutgoingMessage, exchange: str
    ) -> None:
        """Publish on ``channel`` and wait for the broker's ack (aiormq raises on nack/return)."""
        frames = encode_publish(
            channel=channel.number,
            exchange=exchange,
            routing_key=message.routing_key,
            properties=message.properties,
            body=message.body,
            max_body_frame_size=channel.max_content_size,
        )
        # The same bookkeeping as aiormq's basic_publish: its frame reader resolves
        # confirmations by delivery tag, and returned messages by message_id.
        channel.delivery_tag += 1
        delivery_tag = channel.delivery_tag
        confirmation = channel.create_future()
        channel.confirmations[delivery_tag] = confirmation
        message_id = message.properties.message_id
        channel.message_id_delivery_tag[message_id] = delivery_tag
        self._write_soon(channel, frames)
        try:
            await confirmation
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if confirmation.cancelled() and task is not None and not task.cancelling():
                raise BrokerUnavailable("the publishing channel closed") from None
            raise
        finally:
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
            asyncio.get_running_loop().call_soon(self._flush_pending)

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
            asyncio.get_running_loop().call_soon(self._flush_pending)
            return
        self._pending_frames.clear()

    async def _supervise(self) -> None:
        interval = self._supervise_interval
        last_problem = ""
        while True:
            try:
                if self._connection is None:
                    await self._connect()
                if self.connected and not self._topology_ok:
                    await self._ensure_topology()
                if self.connected and self._stalled:
                    await self._probe_broker()
                interval, last_problem = self._supervise_interval, ""
            except asyncio.CancelledError:
                raise
            except Exception as error:  # any failure here means "not ready yet"
                problem = _describe(error)
                if problem != last_problem:
                    logger.warning("broker not ready: %s", problem)
                interval, last_problem = min(interval * 2, MAX_RETRY_INTERVAL), problem
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()

    async def _connect(self) -> None:
        settings = self._settings
        async with asyncio.timeout(max(self._timeout, 10.0)):
            connection = await aio_pika.connect_robust(
                settings.amqp_url.get_secret_value(),
                ssl_context=settings.amqp_ssl_context(),
                client_properties={"connection_name": APP_ID},
                timeout=self._timeout,
                reconnect_interval=RECONNECT_INTERVAL,
            )
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        self._channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        self._connection = connection
        logger.info("connected to broker at %s", settings.amqp_url_redacted)

    def _on_connection_lost(self, *_args: object) -> None:
        self._topology_ok = False
        if not self._closing:
            logger.warning("broker connection lost; reconnecting")

    def _on_reconnected(self, *_args: object) -> None:
        logger.info("reconnected to broker; checking topology")
        self._wake.set()

    async def _ensure_topology(self) -> None:
        assert self._connection is not None
        async with asyncio.timeout(self._timeout), self._connection.channel() as channel:
            if self._settings.declare_topology:
                await declare_topology(channel, self._topology)
            else:
                await check_topology(channel, self._topology)
        self._topology_ok = True
        logger.info(
            "topology %s: exchange %s, unrouted %s, quarantine %s",
            "declared" if self._settings.declare_topology else "checked",
            self._topology.exchange,
            self._topology.unrouted_exchange,
            self._topology.quarantine_exchange,
        )

    async def _probe_broker(self) -> None:
        """A round trip on the publishing connection: it stalls exactly while the broker
        blocks that connection, and needs no permission beyond what publishing needs."""
        assert self._connection is not None
        async with asyncio.timeout(self._timeout), self._connection.channel() as channel:
            await channel.declare_exchange(self._topology.exchange, passive=True)
        self._stalled = False
        logger.info("broker answers again")


async def declare_topology(channel: aio_pika.abc.AbstractChannel, topology: Topology) -> None:
    """Declare the exchanges and queues the bridge publishes to, all durable."""
    for name in (topology.unrouted_exchange, topology.quarantine_exchange):
        exchange = await channel.declare_exchange(name, ExchangeType.FANOUT, durable=True)
        queue = await channel.declare_queue(name, durable=True)
        await queue.bind(exchange)
    await channel.declare_exchange(
        topology.exchange,
        ExchangeType.TOPIC,
        durable=True,
        arguments={"alternate-exchange": topology.unrouted_exchange},
    )


async def check_topology(channel: aio_pika.abc.AbstractChannel, topology: Topology) -> None:
    """Passively check that operator-managed exchanges exist (raises if one does not)."""
    for name in (topology.exchange, topology.unrouted_exchange, topology.quarantine_exchange):
        try:
            await channel.declare_exchange(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise RuntimeError(
                f"exchange {name!r} does not exist and BRIDGE_DECLARE_TOPOLOGY is false; "
                "load the broker definitions or enable declaration"
            ) from None


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
