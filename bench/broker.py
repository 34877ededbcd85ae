"""The harness's own broker connection: counting queues that prove every event arrived."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection, ArgumentsType

T = TypeVar("T")
QueueArguments = tuple[tuple[str, str | int], ...]
"""Queue arguments as name and value pairs, in the order given (``--queue-argument``)."""

QUORUM = "quorum"
QUEUE_TYPES = ("classic", QUORUM)

SETTLE_TIMEOUT_S = 10.0
"""How long to wait for publishes still in flight when wrk stopped to be confirmed."""


def unique_name(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:10]}"


class BrokerProbe:
    """Survives its connection being closed by someone else (another test suite
    restarting or disconnecting the broker): each operation reconnects once and retries."""

    def __init__(
        self, amqp_url: str, queue_type: str, extra_arguments: QueueArguments = ()
    ) -> None:
        self._url = amqp_url
        self._queue_arguments: ArgumentsType = {**dict(extra_arguments), "x-queue-type": queue_type}
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queues: list[str] = []
        self._exchanges: list[str] = []
        self.reconnects = 0
        self.server_version = "unknown"

    @classmethod
    async def connect(
        cls,
        amqp_url: str,
        queue_type: str = QUORUM,
        extra_arguments: QueueArguments = (),
    ) -> BrokerProbe:
        """A probe whose counting queues are of ``queue_type``, declared with
        ``extra_arguments`` too."""
        probe = cls(amqp_url, queue_type, extra_arguments)
        await probe._ready_channel()
        probe.reconnects = 0
        return probe

    async def _ready_channel(self) -> AbstractChannel:
        if self._connection is None or self._connection.is_closed:
            self._connection = await aiormq.connect(self._url)
            self._channel = None
            self.reconnects += 1
            properties = self._connection.server_properties
            self.server_version = (
                f"{properties.get('product', '?')!s} {properties.get('version', '?')!s}"
            )
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        return self._channel

    async def _call(self, operation: Callable[[AbstractChannel], Awaitable[T]]) -> T:
        try:
            return await operation(await self._ready_channel())
        except (aiormq.exceptions.ConnectionClosed, ConnectionError):
            return await operation(await self._ready_channel())

    async def declare_topic_exchange(self, name: str) -> None:
        await self._call(
            lambda channel: channel.exchange_declare(name, exchange_type="topic", durable=True)
        )
        self._exchanges.append(name)

    def forget_exchange(self, name: str) -> None:
        """Delete ``name`` at cleanup, though someone else declared it."""
        self._exchanges.append(name)

    def forget_queue(self, name: str) -> None:
        self._queues.append(name)

    async def bind_counting_queue(self, exchange: str) -> str:
        """A durable queue of the run's queue type receiving everything published to
        ``exchange``."""
        name = unique_name("bench.count")
        await self._call(
            lambda channel: channel.queue_declare(
                name, durable=True, arguments=self._queue_arguments
            )
        )
        self._queues.append(name)
        await self._call(lambda channel: channel.queue_bind(name, exchange, routing_key="#"))
        return name

    async def message_count(self, queue: str) -> int:
        declared = await self._call(lambda channel: channel.queue_declare(queue, passive=True))
        return int(declared.message_count or 0)

    async def settled_count(self, queue: str, expected: int) -> int:
        """The queue's count once it reaches ``expected`` or stops changing."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        count, unchanged_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            current = await self.message_count(queue)
            if current == expected:
                return current
            if current != count:
                count, unchanged_since = current, time.monotonic()
            elif time.monotonic() - unchanged_since > 2.0:
                break
            await asyncio.sleep(0.1)
        return count

    async def purge(self, queue: str) -> None:
        await self._call(lambda channel: channel.queue_purge(queue))

    async def close(self) -> None:
        """Delete every queue and exchange the run created, then disconnect."""
        for queue in self._queues:
            with contextlib.suppress(Exception):
                await self._delete_queue(queue)
        for exchange in self._exchanges:
            with contextlib.suppress(Exception):
                await self._delete_exchange(exchange)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()

    async def _delete_queue(self, name: str) -> None:
        await self._call(lambda channel: channel.queue_delete(name))

    async def _delete_exchange(self, name: str) -> None:
        await self._call(lambda channel: channel.exchange_delete(name))
