"""Redriving stored events: one pass over a source queue (or the archive stream).

At least once, never lost: a source message is acknowledged only after the broker
confirmed its copy, so a replay that dies halfway leaves every unacknowledged message
in the source (the broker requeues them when the connection drops), and the next run
publishes again at most the messages that were between confirm and ack.

A pass over a queue reads at most the messages the queue held when it began, and keeps
every message it leaves in place unacknowledged until the end (then requeues them all
at once): so neither those, nor copies that land back in the same queue (replaying
``unrouted`` while still no queue binds a type), are read twice, and the pass ends.
Whether a copy published to the main exchange was routed to a bound queue or fell
through to the alternate exchange is observed, not guessed: a temporary queue bound to
the unrouted exchange during the pass receives exactly the copies no binding took.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)

from bridge.archive import ArchiveNotFoundError, ArchiveStalledError, history, open_archive
from bridge.nodes import BrokerNodes, first_answering, within
from bridge.publisher import Topology
from bridge.replay.decision import (
    REPLAYED_AT_HEADER,
    Decider,
    Filters,
    Publish,
    Result,
    Target,
    replay_decider,
)
from bridge.settings import Settings
from bridge.signature import InvalidSecretError

CONNECTION_NAME = "openai-webhook-bridge replay"
NAMED_SOURCES = ("unrouted", "quarantine", "dead-letter", "archive")

Progress = Callable[[int, int | None], None]
"""Called after each message: how many were read, and of how many (``None``: unknown)."""


class ReplayError(Exception):
    """The replay cannot start as asked (nothing was read or changed)."""


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    source: str
    filters: Filters = field(default_factory=Filters)
    target: Target = field(default_factory=Target)
    limit: int | None = None
    """Stop after this many messages were replayed."""
    rate: float | None = None
    """At most this many publishes per second."""
    dry_run: bool = False
    extra_secrets: tuple[str, ...] = ()
    """Retired ``whsec_`` secrets accepted for this run only (``--webhook-secret``)."""


@dataclass
class ReplaySummary:
    source: str
    queue: str
    unrouted_queue: str
    dry_run: bool
    replayed: int = 0
    unrouted: int = 0
    """Copies published to the main exchange that no queue binds: in the unrouted queue."""
    malformed: int = 0
    unverifiable: int = 0
    filtered: int = 0
    left: int = 0
    seconds: float = 0.0
    error: str | None = None
    """Why the pass stopped early; every message it had not settled stays in the source."""

    def add(self, result: Result) -> None:
        name = result.value
        setattr(self, name, getattr(self, name) + 1)

    def count(self, result: Result) -> int:
        value: int = getattr(self, result.value)
        return value

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def line(self) -> str:
        """The one-line summary a person reads."""
        replayed = f"{'would replay' if self.dry_run else 'replayed'} {self.replayed}"
        if self.unrouted and self.queue != self.unrouted_queue:
            replayed += f" ({self.unrouted} of them to the unrouted queue: no queue binds them)"
        left = f"{self.left} left in place"
        if self.unrouted and self.queue == self.unrouted_queue:
            left += f" ({self.unrouted} back in {self.queue}: still no queue binds their type)"
        parts = [
            replayed,
            f"{self.malformed} still malformed",
            f"{self.unverifiable} not verifiable",
            f"{self.filtered} skipped by filter",
            left,
        ]
        prefix = f"replay from {self.queue}"
        if self.dry_run:
            prefix += " (dry run: nothing changed)"
        text = f"{prefix}: {', '.join(parts)} in {self.seconds:.1f} s"
        return text if self.error is None else f"{text}; stopped early: {self.error}"


def source_queue(source: str, topology: Topology) -> str:
    """The queue a SOURCE names: the topology's own, or any queue by its name."""
    named = {
        "unrouted": topology.unrouted_exchange,
        "quarantine": topology.quarantine_exchange,
        "dead-letter": f"{topology.exchange}.dead-letter",
        "archive": topology.archive_stream,
    }
    return named.get(source, source)


async def replay(
    settings: Settings,
    options: ReplayOptions,
    *,
    progress: Progress | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> ReplaySummary:
    """One pass over ``options.source``; see the module docstring for the guarantees."""
    topology = Topology.from_settings(settings)
    queue = source_queue(options.source, topology)
    is_stream = queue == topology.archive_stream
    target = options.target
    if is_stream and target.queue is None and target.exchange is None:
        raise ReplayError(
            "replaying the archive needs --to-queue NAME (or --to-exchange, to hand every "
            "bound consumer a second copy on purpose)"
        )
    if target.queue == queue or (is_stream and target.queue == topology.archive_stream):
        raise ReplayError("--to-queue names the source itself")
    try:
        decider = replay_decider(
            secrets=settings.verification_secrets(
                options.extra_secrets, source=options.filters.source
            ),
            topology=topology,
            filters=options.filters,
            target=target,
            source_queue=queue,
            keeps_malformed=queue in (topology.quarantine_exchange, topology.archive_stream),
        )
    except InvalidSecretError as error:
        raise ReplayError(f"--webhook-secret {error}") from None
    summary = ReplaySummary(options.source, queue, topology.unrouted_exchange, options.dry_run)
    timeout = settings.publish_timeout
    started = time.monotonic()
    async with _connect(settings) as connection:
        await _check_exists(connection, "queue", queue, timeout, role="source")
        await _check_exists(connection, "queue", target.queue, timeout, role="target")
        await _check_exists(connection, "exchange", target.exchange, timeout, role="target")
        async with _CopyPublisher.open(connection, topology, options, timeout) as publisher:
            pass_ = _Pass(decider, publisher, options, summary, clock, progress, timeout)
            try:
                if is_stream:
                    await pass_.over_stream(connection, queue)
                else:
                    await pass_.over_queue(connection, queue)
            except (
                aiormq.exceptions.AMQPError,
                ConnectionError,
                TimeoutError,
                ArchiveStalledError,
                ReplayRefused,
            ) as error:
                summary.error = _describe(error)
    summary.seconds = time.monotonic() - started
    return summary


@contextlib.asynccontextmanager
async def _connect(settings: Settings) -> AsyncIterator[AbstractConnection]:
    nodes = BrokerNodes(settings.amqp_urls, random.Random())  # noqa: S311  # spreading only
    try:
        _, connection = await first_answering(
            nodes,
            lambda url: aio_pika.connect(
                url,
                ssl_context=settings.amqp_ssl_context(url),
                client_properties={"connection_name": CONNECTION_NAME},
                timeout=settings.publish_timeout,
            ),
            attempt_seconds=settings.publish_timeout,
        )
    except ConnectionError as error:
        raise ReplayError(str(error)) from None
    try:
        yield connection
    finally:
        with contextlib.suppress(Exception):
            await within(settings.publish_timeout, connection.close())


async def _check_exists(
    connection: AbstractConnection,
    kind: str,
    name: str | None,
    broker_timeout: float,
    *,
    role: str,
) -> None:
    if name is None:
        return
    # A failed passive declare closes its channel, so each check gets one of its own.
    async with asyncio.timeout(broker_timeout), connection.channel() as channel:
        try:
            if kind == "queue":
                await channel.declare_queue(name, passive=True)
            else:
                await channel.declare_exchange(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise ReplayError(f"the {role} {kind} {name!r} does not exist") from None


class _CopyPublisher:
    """Publishes copies with confirms (``mandatory``: nothing vanishes unrouted) and tells
    whether a copy sent to the main exchange fell through to the unrouted queue."""

    def __init__(
        self,
        channel: AbstractChannel,
        main_exchange: str,
        unrouted_probe: AbstractQueue | None,
        timeout: float,
    ) -> None:
        self._channel = channel
        self._main_exchange = main_exchange
        self._unrouted_probe = unrouted_probe
        self._timeout = timeout
        self._exchanges: dict[str, AbstractExchange] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        connection: AbstractConnection,
        topology: Topology,
        options: ReplayOptions,
        broker_timeout: float,
    ) -> AsyncIterator[_CopyPublisher]:
        async with asyncio.timeout(broker_timeout):
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            probe = None
            target = options.target
            to_main = target.queue is None and target.exchange in (None, topology.exchange)
            if to_main and not options.dry_run:
                probe = await channel.declare_queue(exclusive=True, auto_delete=True)
                await probe.bind(topology.unrouted_exchange)
        try:
            yield cls(channel, topology.exchange, probe, broker_timeout)
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(broker_timeout):
                    await channel.close()

    async def publish(self, publish: Publish) -> bool:
        """Publish and wait for the confirm; true if the copy went to the unrouted queue."""
        async with asyncio.timeout(self._timeout):
            exchange = await self._exchange(publish.exchange)
            try:
                await exchange.publish(publish.message, publish.routing_key, mandatory=True)
            except aiormq.exceptions.DeliveryError as error:
                exchange_name = publish.exchange or "(default)"
                raise ReplayRefused(
                    f"the broker did not take a copy for exchange {exchange_name!r} "
                    f"and routing key {publish.routing_key!r}: {_describe(error)}"
                ) from None
            if self._unrouted_probe is None or publish.exchange != self._main_exchange:
                return False
            return await self._fell_through(publish.message)

    async def _exchange(self, name: str) -> AbstractExchange:
        if name == "":
            return self._channel.default_exchange
        if name not in self._exchanges:
            self._exchanges[name] = await self._channel.get_exchange(name, ensure=False)
        return self._exchanges[name]

    async def _fell_through(self, message: aio_pika.Message) -> bool:
        # The confirm comes once every queue the copy was routed to holds it, the probe
        # included: if it is not in the probe now, a binding took it.
        assert self._unrouted_probe is not None
        found = False
        while (seen := await self._unrouted_probe.get(no_ack=True, fail=False)) is not None:
            found |= seen.message_id == message.message_id and seen.headers.get(
                REPLAYED_AT_HEADER
            ) == message.headers.get(REPLAYED_AT_HEADER)
        return found


class ReplayRefused(Exception):
    """The broker returned or refused a copy: the pass stops, the source keeps it."""


class _Pacer:
    """At most ``rate`` publishes per second, evenly spaced."""

    def __init__(self, rate: float | None) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self._interval:
            return
        now = time.monotonic()
        if now < self._next:
            await asyncio.sleep(self._next - now)
        self._next = max(now, self._next) + self._interval


@dataclass
class _Pass:
    decider: Decider
    publisher: _CopyPublisher
    options: ReplayOptions
    summary: ReplaySummary
    clock: Callable[[], datetime]
    progress: Progress | None
    timeout: float
    _pacer: _Pacer = field(init=False)
    _returned_copies: set[tuple[str | None, object]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._pacer = _Pacer(self.options.rate)

    @property
    def _limit_reached(self) -> bool:
        limit = self.options.limit
        return limit is not None and self.summary.replayed >= limit

    async def over_queue(self, connection: AbstractConnection, name: str) -> None:
        async with asyncio.timeout(self.timeout):
            channel = await connection.channel()
            queue = await channel.declare_queue(name, passive=True)
        total = queue.declaration_result.message_count or 0
        last_held: AbstractIncomingMessage | None = None
        read = 0
        try:
            while read < total and not self._limit_reached:
                async with asyncio.timeout(self.timeout):
                    message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break  # another consumer took the rest
                if self._is_own_copy(message):
                    last_held = message
                    break  # past the messages this pass started with
                read += 1
                if not await self._settle(message, name, acknowledge=True):
                    last_held = message
                if self.progress is not None:
                    self.progress(read, total)
            if self._limit_reached:
                self.summary.left += max(0, total - read)
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout):
                    if last_held is not None:
                        await last_held.nack(multiple=True, requeue=True)
                    await channel.close()

    async def over_stream(self, connection: AbstractConnection, name: str) -> None:
        start = self.options.filters.since or "first"
        read = 0
        try:
            async with open_archive(
                connection, name, start=start, broker_timeout=self.timeout
            ) as reader:
                async for message in history(reader, stall_timeout=self.timeout):
                    read += 1
                    # Nothing leaves a stream: the reader acknowledges, for credit only.
                    await self._settle(message, name, acknowledge=False)
                    if self.progress is not None:
                        self.progress(read, None)
                    if self._limit_reached:
                        break
        except ArchiveNotFoundError as error:
            raise ReplayError(str(error)) from None

    async def _settle(
        self, message: AbstractIncomingMessage, source: str, *, acknowledge: bool
    ) -> bool:
        """Decide, publish if due, count; true if the message was copied (and, with
        ``acknowledge``, removed from its source after the confirm)."""
        replayed_at = self.clock().isoformat(timespec="microseconds")
        decision = self.decider.decide(message, replayed_at)
        if decision.publish is None or self.options.dry_run:
            self.summary.add(decision.result)
            return False
        await self._pacer.wait()
        unrouted = await self.publisher.publish(decision.publish)
        result = decision.result
        if unrouted:
            self.summary.unrouted += 1
            if source == self.summary.unrouted_queue:
                result = Result.LEFT
                self._returned_copies.add((message.message_id, replayed_at))
        if acknowledge:
            async with asyncio.timeout(self.timeout):
                await message.ack()
        self.summary.add(result)
        return True

    def _is_own_copy(self, message: AbstractIncomingMessage) -> bool:
        return (message.message_id, message.headers.get(REPLAYED_AT_HEADER)) in (
            self._returned_copies
        )


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
