"""Commands to the shared Redis, sent once per event-loop turn, wherever that Redis is.

All commands issued during one event-loop turn go to Redis as one pipeline (one write,
one round trip): under load each round trip carries the commands of many requests. Each
pipeline is bounded as a whole by the store's timeout (``BRIDGE_DEDUP_TIMEOUT``), so
every command's future is resolved (reply, or :class:`StoreUnavailable`) within that
timeout of the turn it was issued in.

:func:`connect` makes the sender the URL names (:mod:`bridge.redis_url`): one Redis, the
master a set of Sentinels names (asked again on every new connection, so a failover is
followed without a restart), or a Redis Cluster (its pipelines split by slot and sent to
each slot's master, following ``MOVED`` answers).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from bridge.dedup.store import StoreUnavailable
from bridge.extras import MissingExtraError
from bridge.redis_url import RedisKind, RedisLocation

try:
    from redis.asyncio import Redis, RedisCluster
    from redis.asyncio.cluster import ClusterNode
    from redis.asyncio.connection import AbstractConnection
    from redis.asyncio.retry import Retry
    from redis.asyncio.sentinel import Sentinel
    from redis.backoff import NoBackoff
    from redis.exceptions import (
        ClusterDownError,
        NoScriptError,
        RedisError,
        ResponseError,
    )
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as missing:
    raise MissingExtraError(__name__, "redis") from missing

CLIENT_NAME = "openai-webhook-bridge"

Command = tuple[bytes, ...]


class Commands(Protocol):
    sharded: bool
    """Whether keys live on several masters (a cluster): then a command or script may only
    touch keys of one hash slot."""

    def run(self, command: Command) -> asyncio.Future[Any]:
        """Queue ``command`` for this turn's pipeline. Its future fails with
        :class:`StoreUnavailable`, or with :class:`~redis.exceptions.NoScriptError` for an
        ``EVALSHA`` of a script that server does not hold (yet)."""
        ...

    async def close(self) -> None: ...

    async def config_get(self, pattern: str) -> list[dict[str, str]]:
        """``CONFIG GET pattern`` on every master. Raises :class:`StoreUnavailable`."""
        ...


def connect(location: RedisLocation, *, timeout: float) -> Commands:
    """The pipelined sender for ``location``. Every connection fails fast: every retry and
    reconnect decision is the caller's."""
    fail_fast = Retry(NoBackoff(), 0)
    if location.kind is RedisKind.CLUSTER:
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in location.hosts],
            username=location.username,
            password=location.password,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            # A master that failed over answers MOVED: find the new one at once.
            reinitialize_steps=1,
            retry=fail_fast,
            client_name=CLIENT_NAME,
        )
        return ClusterCommands(cluster, timeout=timeout)
    if location.kind is RedisKind.SENTINEL:
        sentinels = Sentinel(  # type: ignore[no-untyped-call]
            list(location.hosts), socket_connect_timeout=timeout, socket_timeout=timeout
        )
        master = sentinels.master_for(
            location.service_name,
            username=location.username,
            password=location.password,
            db=location.db,
            socket_connect_timeout=timeout,
            socket_timeout=None,
            retry=fail_fast,
            client_name=CLIENT_NAME,
        )
        return PipelinedCommands(master, timeout=timeout)
    # No socket timeout: each pipeline is bounded as a whole by the caller's deadline,
    # which spares a timer per read and per write.
    client = Redis.from_url(
        location.url,
        socket_connect_timeout=timeout,
        socket_timeout=None,
        retry=fail_fast,
        client_name=CLIENT_NAME,
    )
    return PipelinedCommands(client, timeout=timeout)


def describe(error: BaseException) -> str:
    """Safe to log: the error's type and, for a refusal, Redis's error code (``OOM``, ...)."""
    if isinstance(error, ResponseError) and error.args:
        return f"{type(error).__name__} {str(error.args[0]).split(' ', 1)[0]}"
    return type(error).__name__


def pack(commands: list[Command]) -> bytes:
    """The commands in RESP, ready for one write (redis-py's general packer costs several
    times more per command than the whole rest of a claim)."""
    parts = []
    for command in commands:
        parts.append(b"*%d\r\n" % len(command))
        for argument in command:
            parts.append(b"$%d\r\n%b\r\n" % (len(argument), argument))
    return b"".join(parts)


_NODE_LOST = (RedisConnectionError, RedisTimeoutError, ClusterDownError, OSError)

Batch = list[tuple[Command, "asyncio.Future[Any]"]]


class PipelinedCommands:
    """Sends the commands issued during one event-loop turn as one pipeline, to one Redis.

    Each pipeline runs on a connection of its own (made by the client's pool, from the
    URL, so authentication, database and TLS are redis-py's; for Sentinel, a connection
    that asks the Sentinels where the master is). The idle connections are kept here
    rather than in the pool: a connection is reused only after every reply on it was
    read, so the pool's per-checkout health checks would cost more than the round trip
    they guard.
    """

    sharded = False

    def __init__(self, client: Redis | RedisCluster, *, timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        self._pending: Batch = []
        self._pipelines: set[asyncio.Task[None]] = set()
        self._idle: list[AbstractConnection] = []

    def run(self, command: Command) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((command, future))
        if len(self._pending) == 1:
            loop.call_soon(self._send)
        return future

    async def config_get(self, pattern: str) -> list[dict[str, str]]:
        reply = await self.run((b"CONFIG", b"GET", pattern.encode()))
        return [_text_map(reply)]

    async def close(self) -> None:
        for pipeline in self._pipelines:
            pipeline.cancel()
        await asyncio.gather(*self._pipelines, return_exceptions=True)
        await self._disconnect_idle()
        await self.client.aclose()

    def _send(self) -> None:
        batch, self._pending = self._pending, []
        pipeline = asyncio.get_running_loop().create_task(self._execute(batch))
        self._pipelines.add(pipeline)
        pipeline.add_done_callback(self._pipelines.discard)

    async def _execute(self, batch: Batch) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._round_trip(batch)
        except BaseException as error:
            # Whatever happened (cancelled by close() included), no caller is left waiting.
            for _command, future in batch:
                _fail(future, error)
            if not isinstance(error, RedisError | OSError | TimeoutError):
                raise

    async def _round_trip(self, batch: Batch) -> None:
        connection = await self._checkout()
        try:
            await connection.send_packed_command(pack([c for c, _ in batch]), False)
            for _command, future in batch:
                try:
                    reply = await connection.read_response()
                except ResponseError as refusal:
                    _fail(future, refusal)
                else:
                    if not future.done():
                        future.set_result(reply)
        except BaseException:
            # A reply left unread would be taken for the next command's; and the idle
            # connections most likely lost their server too (a restart, a failover).
            await connection.disconnect(nowait=True)
            await self._disconnect_idle()
            raise
        self._idle.append(connection)

    async def _disconnect_idle(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.disconnect(nowait=True)

    async def _checkout(self) -> AbstractConnection:
        if self._idle:
            return self._idle.pop()
        pool = self.client.connection_pool  # type: ignore[union-attr]
        connection: AbstractConnection = pool.make_connection()
        await connection.connect()  # type: ignore[no-untyped-call]
        return connection


class ClusterCommands(PipelinedCommands):
    """One turn's commands through redis-py's cluster pipeline: split by hash slot, sent to
    each slot's master concurrently, re-sent where a master answered ``MOVED`` (after a
    failover or a resharding) once the slot map was read again."""

    sharded = True

    async def config_get(self, pattern: str) -> list[dict[str, str]]:
        cluster: RedisCluster = self.client  # type: ignore[assignment]
        try:
            async with asyncio.timeout(self.timeout):
                replies = await cluster.config_get(pattern, target_nodes=RedisCluster.PRIMARIES)
        except (RedisError, OSError, TimeoutError) as error:
            raise StoreUnavailable(describe(error)) from None
        # One master answers with its settings, several with their settings by node name.
        values = list(replies.values())
        if values and not isinstance(values[0], dict):
            return [_text_map(replies)]
        return [_text_map(value) for value in values]

    async def _round_trip(self, batch: Batch) -> None:
        # Cancelled mid-reply, redis-py's cluster pipeline would keep its connections
        # checked out for good (and soon have none left): at the deadline the callers are
        # answered, and the pipeline is left to finish, bounded by each node's socket timeout.
        pipeline = asyncio.get_running_loop().create_task(self._cluster_round_trip(batch))
        self._pipelines.add(pipeline)
        pipeline.add_done_callback(self._pipelines.discard)
        pipeline.add_done_callback(_finished_alone)
        await asyncio.shield(pipeline)

    async def _cluster_round_trip(self, batch: Batch) -> None:
        pipeline = self.client.pipeline()
        for (name, *arguments), _future in batch:
            pipeline.execute_command(name.decode(), *arguments)  # routed by its name: a str
        try:
            replies = await pipeline.execute(raise_on_error=False)
        except (RedisError, OSError):
            await self._read_slots_again()
            raise
        for (_command, future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):
                _fail(future, reply)
            elif not future.done():
                future.set_result(reply)
        if any(isinstance(reply, _NODE_LOST) for reply in replies):
            await self._read_slots_again()

    async def _read_slots_again(self) -> None:
        """Forget the slot map (and drop the connections): the next pipeline asks a seed
        node which master serves each slot now. A lost master's replica is promoted within
        ``cluster-node-timeout`` and a little more; redis-py itself only looks again when
        an error ends the whole pipeline."""
        await self.client.aclose()


def _text_map(reply: Any) -> dict[str, str]:
    """A ``CONFIG GET`` reply (a map in RESP3, names and values in turn in RESP2) as text."""
    pairs = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
    return {_text(name): _text(value) for name, value in pairs}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _finished_alone(pipeline: asyncio.Task[None]) -> None:
    """Retrieves what a pipeline left to finish after its deadline ended with."""
    if not pipeline.cancelled():
        pipeline.exception()


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if future.done():
        return
    if isinstance(error, NoScriptError):
        future.set_exception(error)
    else:
        future.set_exception(StoreUnavailable(describe(error)))
