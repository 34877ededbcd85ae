"""Reading the archive stream: from a point in time, up to where it ended, then live.

The bridge's topology (:mod:`bridge.publisher`) feeds the stream ``<exchange>.archive``
with every authentic event it accepts. A stream is read by a consumer with a prefetch
and manual acknowledgements (an ack only grants credit: nothing leaves a stream) and an
``x-stream-offset`` argument: ``"first"``, or a timestamp, from which RabbitMQ starts at
the first chunk written at or after that time.

AMQP 0-9-1 tells a stream reader nothing about where the stream ends, so the reader first
reads the last chunk (offset ``"last"``) to learn the offset of the newest message: a
read "up to now" stops there, and anything after it is live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Self

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from pydantic import ValidationError

from bridge.consumer import (
    Delivery,
    PatternReader,
    VerifySecrets,
    close_deliveries,
    connect_to_a_node,
    message_source,
    signature_problem,
    stored_message_verifier,
)
from bridge.events import parse_event
from bridge.publisher import QUARANTINE_REASON_HEADER
from bridge.topic import any_topic_matches

logger = logging.getLogger(__name__)

STREAM_OFFSET_HEADER = "x-stream-offset"
DEFAULT_PREFETCH = 200
# With data to deliver, a stream sends its first chunk at once; silence this long means
# there is nothing (more) to read from the last chunk.
FIRST_CHUNK_WAIT = 2.0
LAST_CHUNK_IDLE = 0.3
# A timestamp offset starts at the first chunk the broker wrote at or after that time by
# its own clock; starting this much earlier covers clock skew against the event's created_at.
CLOCK_MARGIN = timedelta(minutes=5)

StreamOffset = datetime | str


class ArchiveNotFoundError(Exception):
    """The archive stream does not exist: the bridge runs without an archive."""

    def __init__(self, stream: str) -> None:
        super().__init__(
            f"there is no archive stream {stream!r}; the bridge keeps one only with "
            "BRIDGE_ARCHIVE_MAX_AGE or BRIDGE_ARCHIVE_MAX_BYTES set"
        )
        self.stream = stream


class ArchiveStalledError(Exception):
    """The stream stopped delivering before the reader reached the end it had found."""


def stream_offset(message: AbstractIncomingMessage) -> int:
    offset = message.headers.get(STREAM_OFFSET_HEADER)
    if not isinstance(offset, int):
        raise ArchiveStalledError("a stream delivery without an integer x-stream-offset")
    return offset


class ArchiveReader:
    """Messages of one stream from ``start`` on, knowing the offset that was last when
    reading began (``tail``, ``None`` for an empty stream).

    Each message is acknowledged when the next one is asked for, so at most
    ``prefetch`` are in the client at a time.
    """

    def __init__(
        self,
        connection: AbstractConnection,
        stream: str,
        *,
        start: StreamOffset,
        prefetch: int = DEFAULT_PREFETCH,
        timeout: float = 10.0,
    ) -> None:
        self._connection = connection
        self._stream = stream
        self._start = start
        self._prefetch = prefetch
        self._timeout = timeout
        self._messages: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._unacked: AbstractIncomingMessage | None = None
        self.tail: int | None = None

    async def open(self) -> None:
        async with asyncio.timeout(self._timeout):
            await _require_stream(self._connection, self._stream)
        self.tail = await self._find_tail()
        start = self._start
        if isinstance(start, datetime):
            # The stream seeks by the broker's clock; callers filter on the event's own time.
            start -= CLOCK_MARGIN
        async with asyncio.timeout(self._timeout):
            channel = await self._connection.channel()
            await channel.set_qos(prefetch_count=self._prefetch)
            queue = await channel.get_queue(self._stream, ensure=False)
            await queue.consume(self._received, arguments={STREAM_OFFSET_HEADER: start})

    async def next(self, wait: float | None) -> AbstractIncomingMessage | None:
        """The next message, or ``None`` if none arrives within ``wait`` seconds."""
        await self._settle()
        try:
            async with asyncio.timeout(wait):
                message = await self._messages.get()
        except TimeoutError:
            return None
        self._unacked = message
        return message

    def is_past_tail(self, message: AbstractIncomingMessage) -> bool:
        """Whether the message arrived after reading began (it is live, not history)."""
        return self.tail is None or stream_offset(message) > self.tail

    async def _settle(self) -> None:
        message, self._unacked = self._unacked, None
        if message is not None and not message.processed:  # the caller may have acked it
            async with asyncio.timeout(self._timeout):
                await message.ack()

    async def _received(self, message: AbstractIncomingMessage) -> None:
        self._messages.put_nowait(message)

    async def _find_tail(self) -> int | None:
        """The offset of the newest message: read the last chunk to its end."""
        newest: int | None = None
        arrived = asyncio.Event()

        async def note(message: AbstractIncomingMessage) -> None:
            nonlocal newest
            offset = stream_offset(message)
            newest = offset if newest is None else max(newest, offset)
            arrived.set()
            await message.ack()

        async with asyncio.timeout(self._timeout + FIRST_CHUNK_WAIT * 2):
            channel = await self._connection.channel()
            try:
                await channel.set_qos(prefetch_count=self._prefetch)
                queue = await channel.get_queue(self._stream, ensure=False)
                await queue.consume(note, arguments={STREAM_OFFSET_HEADER: "last"})
                wait = FIRST_CHUNK_WAIT
                while True:
                    arrived.clear()
                    try:
                        async with asyncio.timeout(wait):
                            await arrived.wait()
                    except TimeoutError:
                        break
                    wait = LAST_CHUNK_IDLE
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
        return newest

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._settle()


async def _require_stream(connection: AbstractConnection, stream: str) -> None:
    # A failed passive declare closes its channel, so it gets one of its own.
    async with connection.channel() as probe:
        try:
            await probe.declare_queue(stream, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise ArchiveNotFoundError(stream) from None


@contextlib.asynccontextmanager
async def open_archive(
    connection: AbstractConnection, stream: str, *, start: StreamOffset, broker_timeout: float
) -> AsyncIterator[ArchiveReader]:
    reader = ArchiveReader(connection, stream, start=start, timeout=broker_timeout)
    await reader.open()
    try:
        yield reader
    finally:
        await reader.close()


async def history(
    reader: ArchiveReader, *, stall_timeout: float
) -> AsyncIterator[AbstractIncomingMessage]:
    """The messages from the reader's start up to the tail it found, then stop.

    Nothing at all at first means the start lies past the end: nothing to read.
    """
    if reader.tail is None:
        return
    wait = max(FIRST_CHUNK_WAIT, stall_timeout)
    first = True
    while True:
        message = await reader.next(wait)
        if message is None and first:
            return
        first = False
        if message is None:
            raise ArchiveStalledError(
                f"the archive stream delivered nothing for {wait:g} s before its end "
                f"(offset {reader.tail})"
            )
        if reader.is_past_tail(message):
            return
        yield message
        if stream_offset(message) >= reader.tail:
            return


class ArchiveFollower(PatternReader):
    """``consume --since``: archived events matching ``patterns`` from ``since`` on, then
    live ones, as :class:`bridge.consumer.Delivery` objects like ``EventConsumer`` yields.

    ``since`` and ``until`` are compared with each message's timestamp (the event's
    ``created_at``). With ``until``, the stream is read to the end it had when reading
    began, then live events are followed until the clock passes ``until``. Quarantined
    events (in the archive too) are not events a binding would receive: skipped.
    ``ca_file`` verifies an ``amqps://`` broker against that CA bundle, as
    ``BRIDGE_AMQP_CA_FILE`` does for the bridge.
    """

    def __init__(
        self,
        amqp_url: str,
        *,
        exchange: str,
        patterns: Sequence[str],
        since: datetime,
        until: datetime | None = None,
        verify_secrets: VerifySecrets = (),
        source: str | None = None,
        ca_file: str | Path | None = None,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(exchange, patterns)
        self._amqp_url = amqp_url
        self._ca_file = ca_file
        self._since = since
        self._until = until
        self._verifier = stored_message_verifier(verify_secrets)
        self._source = source
        self._timeout = timeout
        self._clock = clock
        self._connection: AbstractConnection | None = None
        self._reader: ArchiveReader | None = None
        self._stream: AsyncGenerator[Delivery, None] | None = None

    @property
    def queue_name(self) -> str:
        return f"{self._exchange}.archive"

    async def __aenter__(self) -> Self:
        async with asyncio.timeout(self._timeout):
            connection = await connect_to_a_node(
                self._amqp_url,
                aio_pika.connect,
                attempt_seconds=self._timeout,
                ca_file=self._ca_file,
            )
        try:
            self._reader = ArchiveReader(
                connection, self.queue_name, start=self._since, timeout=self._timeout
            )
            await self._reader.open()
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        self._connection = connection
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        connection, stream = self._connection, self._stream
        self._connection, self._reader, self._stream = None, None, None
        await close_deliveries(stream, connection, self._timeout)

    def __aiter__(self) -> AsyncIterator[Delivery]:
        if self._stream is None:
            if self._reader is None:
                raise RuntimeError("use the follower inside 'async with'")
            self._stream = self._deliveries(self._reader)
        return self._stream

    async def _deliveries(self, reader: ArchiveReader) -> AsyncGenerator[Delivery, None]:
        caught_up = reader.tail is None
        while True:
            wait = None if caught_up else max(FIRST_CHUNK_WAIT, self._timeout)
            if caught_up and self._until is not None:
                wait = self._until.timestamp() - self._clock()
                if wait <= 0:
                    return
            message = await reader.next(wait)
            if message is None:
                if caught_up:
                    return
                caught_up = True  # the history ended early: nothing after ``since``
                continue
            live = reader.is_past_tail(message)
            caught_up = caught_up or live or stream_offset(message) >= (reader.tail or 0)
            delivery = self._admit(message)
            if delivery is not None:
                yield delivery

    def _admit(self, message: AbstractIncomingMessage) -> Delivery | None:
        if QUARANTINE_REASON_HEADER in message.headers:
            return None
        if not any_topic_matches(self._patterns, message.routing_key or ""):
            return None
        if self._source is not None and message_source(message) != self._source:
            return None
        moment = message.timestamp
        if moment is None or moment < self._since:
            return None
        if self._until is not None and moment > self._until:
            return None
        context = {"message_id": message.message_id, "routing_key": message.routing_key}
        if self._verifier is not None:
            problem = signature_problem(self._verifier, message)
            if problem is not None:
                logger.warning(
                    "skipping an archived message that fails signature verification",
                    extra={**context, "reason": problem},
                )
                return None
        try:
            event = parse_event(message.body)
        except ValidationError:
            logger.warning(
                "skipping an archived message that is not a webhook event", extra=context
            )
            return None
        return Delivery(event, message)
