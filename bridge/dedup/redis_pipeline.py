"""Commands to the shared Redis, sent once per event-loop turn, wherever that Redis is.

All commands issued during one event-loop turn go to Redis as one pipeline (one write,
one round trip): under load each round trip carries the commands of many requests. Every
command's future is resolved (reply, or :class:`StoreUnavailable`) within the store's
timeout (``BRIDGE_DEDUP_TIMEOUT``) of the turn it was issued in.

:func:`connect` makes the sender the URL names (:mod:`bridge.redis_url`): one Redis, the
master a set of Sentinels names (asked again on every new connection, so a failover is
followed without a restart), or a Redis Cluster (its pipelines split by slot and sent to
each slot's master, following ``MOVED`` answers).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Protocol

from bridge.dedup.store import StoreUnavailable
from bridge.extras import MissingExtraError
from bridge.redis_url import RedisKind, RedisLocation

try:
    import hiredis
    from redis.asyncio import Redis, RedisCluster
    from redis.asyncio.cluster import ClusterNode
    from redis.asyncio.connection import AbstractConnection
    from redis.asyncio.retry import Retry
    from redis.asyncio.sentinel import Sentinel
    from redis.backoff import NoBackoff
    from redis.exceptions import (
        ClusterDownError,
        NoScriptError,
        ReadOnlyError,
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
        # redis 8.1 leaves Sentinel's __init__ untyped and 8.2 types it; the floor allows both.
        sentinels = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
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


class _TurnBatcher:
    """Collects the commands issued during one event-loop turn, and sends them as one."""

    sharded = False

    def __init__(self, *, timeout: float) -> None:
        self.timeout = timeout
        self._pending: Batch = []

    def run(self, command: Command) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((command, future))
        if len(self._pending) == 1:
            loop.call_soon(self._send)
        return future

    def _send(self) -> None:
        raise NotImplementedError


_NO_REPLY_YET = object()


class _Replies(asyncio.Protocol):
    """One connection to Redis, read by the event loop as bytes arrive: each reply resolves
    the future of the oldest command still waiting (Redis answers in order).

    No task, timer or coroutine per pipeline or per reply: one timer, set for the oldest
    waiting command's deadline, closes the connection (and fails every command on it) when
    that command is still unanswered then, since a reply left unread would be taken for
    the next command's.
    """

    def __init__(self, redis_connection: AbstractConnection, timeout: float) -> None:
        # redis-py made the connection (TLS, AUTH or HELLO, SELECT, CLIENT SETNAME, all from
        # the URL); from here its socket is read by this protocol instead of its stream.
        writer = redis_connection._writer
        assert writer is not None, "redis-py's connection is not connected"
        self._redis_connection = redis_connection
        self._transport = writer.transport
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._parser = hiredis.Reader(notEnoughData=_NO_REPLY_YET)
        self._waiting: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self.open = True
        self._transport.set_protocol(self)

    def send(self, batch: Batch) -> None:
        self._transport.write(pack([command for command, _future in batch]))
        deadline = self._loop.time() + self._timeout
        self._waiting.extend((deadline, future) for _command, future in batch)
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._check_oldest)

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        try:
            while (reply := self._parser.gets()) is not _NO_REPLY_YET:
                if not self._waiting:
                    raise hiredis.ProtocolError("a reply to no command")
                _deadline, future = self._waiting.popleft()
                if isinstance(reply, hiredis.ReplyError):
                    refusal = _refusal(str(reply))
                    _fail(future, refusal)
                    if isinstance(refusal, ReadOnlyError):
                        # A master demoted to a replica: the next connection asks again
                        # where the master is (Sentinel), as redis-py's own does.
                        self.close(refusal)
                        return
                elif not future.done():
                    future.set_result(reply)
        except hiredis.ProtocolError as error:
            self.close(error)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, error: Exception | None) -> None:
        self.close(error or RedisConnectionError("Redis closed the connection"))

    def close(self, error: BaseException) -> None:
        if not self.open:
            return
        self.open = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, deque()
        for _deadline, future in waiting:
            _fail(future, error)
        self._transport.abort()
        self._redis_connection._close()  # type: ignore[no-untyped-call]

    def _check_oldest(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        oldest_deadline = self._waiting[0][0]
        if oldest_deadline <= self._loop.time():
            self.close(RedisTimeoutError("no reply within the timeout"))
        else:
            self._timer = self._loop.call_at(oldest_deadline, self._check_oldest)


class PipelinedCommands(_TurnBatcher):
    """Sends the commands issued during one event-loop turn as one pipeline, to one Redis,
    all on one connection: Redis serves one client's commands in order, one at a time, so
    a second connection would add a socket to read and nothing to the throughput.

    The connection is made by the client's pool, from the URL, so authentication,
    database and TLS are redis-py's; for Sentinel, a connection that asks the Sentinels
    where the master is. A lost connection fails the commands waiting on it; the next
    turn's commands make a new one.
    """

    def __init__(self, client: Redis, *, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self.client = client
        self._connection: _Replies | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._held: list[Batch] = []

    async def config_get(self, pattern: str) -> list[dict[str, str]]:
        reply = await self.run((b"CONFIG", b"GET", pattern.encode()))
        return [_text_map(reply)]

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        if self._connection is not None:
            self._connection.close(RedisConnectionError("closed"))
        await self.client.aclose()

    def _send(self) -> None:
        batch, self._pending = self._pending, []
        connection = self._connection
        if connection is not None and connection.open:
            connection.send(batch)
            return
        self._held.append(batch)
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                pool = self.client.connection_pool
                redis_connection = pool.make_connection()  # type: ignore[no-untyped-call]
                await redis_connection.connect()
            connection = self._connection = _Replies(redis_connection, self.timeout)
        except BaseException as error:
            # Whatever happened (cancelled by close() included), no caller is left waiting.
            held, self._held = self._held, []
            for batch in held:
                for _command, future in batch:
                    _fail(future, error)
            if not isinstance(error, RedisError | OSError | TimeoutError):
                raise
        else:
            held, self._held = self._held, []
            for batch in held:
                connection.send(batch)
        finally:
            self._connecting = None


class ClusterCommands(_TurnBatcher):
    """One turn's commands through redis-py's cluster pipeline: split by hash slot, sent to
    each slot's master concurrently, re-sent where a master answered ``MOVED`` (after a
    failover or a resharding) once the slot map was read again."""

    sharded = True

    def __init__(self, client: RedisCluster, *, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self.client = client
        self._pipelines: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        # Each pipeline ends within the timeout: let those sent be answered.
        await asyncio.gather(*self._pipelines, return_exceptions=True)
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
            # Whatever happened (a cancellation included), no caller is left waiting.
            for _command, future in batch:
                _fail(future, error)
            if not isinstance(error, RedisError | OSError | TimeoutError):
                raise

    async def config_get(self, pattern: str) -> list[dict[str, str]]:
        cluster = self.client
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


def _refusal(message: str) -> ResponseError:
    """Redis's error reply as redis-py's exception for it (the ones this module tells apart)."""
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith("READONLY"):
        return ReadOnlyError(message)
    return ResponseError(message)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if future.done():
        return
    if isinstance(error, NoScriptError):
        future.set_exception(error)
    else:
        future.set_exception(StoreUnavailable(describe(error)))
