"""Claims and confirmations in Redis, shared by every pod (and every consumer replica).

Each id is one string key, ``<prefix><id>``:

- ``SET key inflight:<owner token> NX PX <claim ttl> GET`` claims it atomically and
  returns what was there (Redis 7 allows ``NX`` with ``GET``): nothing means the claim is
  ours; ``confirmed`` a duplicate; another ``inflight:`` token a copy in flight elsewhere;
- ``SET key confirmed PX <window>`` after the broker's confirm;
- a compare-and-delete script releases a claim only while it still holds our token, so a
  claim that expired and was taken over by another pod is left alone.

All commands issued during one event-loop turn go to Redis as one pipeline (one write,
one round trip), on a connection redis-py made from the URL, read with its hiredis parser:
under load each round trip carries the commands of many requests. Each pipeline is
bounded as a whole by the store's timeout (``BRIDGE_DEDUP_TIMEOUT``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from bridge.dedup.store import Claim, ClaimState, StoreUnavailable
from bridge.extras import MissingExtraError

try:
    from redis.asyncio import Redis
    from redis.asyncio.connection import AbstractConnection
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError, ResponseError
except ImportError as missing:
    raise MissingExtraError(__name__, "redis") from missing

logger = logging.getLogger(__name__)

CONFIRMED = b"confirmed"
PROBE_INTERVAL_SECONDS = 0.5
_FIRST_POLL_SECONDS = 0.01
_LONGEST_POLL_SECONDS = 0.1

# KEYS[1] the claimed key, ARGV[1] our token: delete only what we still own.
RELEASE_SCRIPT = b"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

Command = tuple[bytes, ...]


def connect(url: str, *, timeout: float) -> Redis:
    """A client that fails fast: every retry and reconnect decision is the caller's.

    No socket timeout: each pipeline is bounded as a whole by the caller's deadline,
    which spares a timer per read and per write.
    """
    return Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=None,
        retry=Retry(NoBackoff(), 0),
        client_name="openai-webhook-bridge",
    )


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


class PipelinedCommands:
    """Sends the commands issued during one event-loop turn as one pipeline.

    Each pipeline runs on a connection of its own (made by the client's pool, from the
    URL, so authentication, database and TLS are redis-py's) and is bounded by
    ``timeout`` as a whole: every command's future is resolved (reply, or
    :class:`StoreUnavailable`) within ``timeout`` of the turn it was issued in. The
    idle connections are kept here rather than in the pool: a connection is reused only
    after every reply on it was read, so the pool's per-checkout health checks would
    cost more than the round trip they guard.
    """

    def __init__(self, client: Redis, *, timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        self._pending: list[tuple[Command, asyncio.Future[Any]]] = []
        self._pipelines: set[asyncio.Task[None]] = set()
        self._idle: list[AbstractConnection] = []

    def run(self, command: Command) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((command, future))
        if len(self._pending) == 1:
            loop.call_soon(self._send)
        return future

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

    async def _execute(self, batch: list[tuple[Command, asyncio.Future[Any]]]) -> None:
        try:
            async with asyncio.timeout(self.timeout):
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
                    # A reply left unread would be taken for the next command's; and the
                    # idle connections most likely lost their server too (a restart).
                    await connection.disconnect(nowait=True)
                    await self._disconnect_idle()
                    raise
                self._idle.append(connection)
        except BaseException as error:
            # Whatever happened (cancelled by close() included), no caller is left waiting.
            for _command, future in batch:
                _fail(future, error)
            if not isinstance(error, RedisError | OSError | TimeoutError):
                raise

    async def _disconnect_idle(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.disconnect(nowait=True)

    async def _checkout(self) -> AbstractConnection:
        if self._idle:
            return self._idle.pop()
        pool = self.client.connection_pool
        connection: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
        await connection.connect()  # type: ignore[no-untyped-call]
        return connection


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(StoreUnavailable(describe(error)))


class RedisClaims:
    """Claim, confirm and release ids under one key prefix."""

    def __init__(self, commands: PipelinedCommands, *, prefix: str) -> None:
        self.commands = commands
        self.prefix = prefix.encode()
        owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._tokens = (f"inflight:{owner}:{n}".encode() for n in itertools.count())

    async def claim(self, key: str, ttl_ms: int) -> Claim:
        token = next(self._tokens)
        previous = await self.commands.run(
            (b"SET", self.prefix + key.encode(), token, b"NX", b"PX", b"%d" % ttl_ms, b"GET")
        )
        if previous is None:
            return Claim(key, ClaimState.NEW, token)
        return Claim(key, state_of(previous))

    async def confirm(self, key: str, ttl_ms: int) -> None:
        name = self.prefix + key.encode()
        await self.commands.run((b"SET", name, CONFIRMED, b"PX", b"%d" % ttl_ms))

    async def release(self, claim: Claim) -> None:
        name = self.prefix + claim.key.encode()
        await self.commands.run((b"EVAL", RELEASE_SCRIPT, b"1", name, claim.token))

    async def state(self, key: str) -> ClaimState | None:
        """What the store holds for ``key`` now; ``None`` when nothing (released or expired)."""
        value = await self.commands.run((b"GET", self.prefix + key.encode()))
        return None if value is None else state_of(value)

    async def write_probe(self, name: str) -> None:
        await self.commands.run((b"SET", self.prefix + name.encode(), b"1", b"PX", b"5000"))


def state_of(value: bytes) -> ClaimState:
    # Anything but our confirmation (a value written by something else under our prefix)
    # counts as in flight: never a 2xx on a guess.
    return ClaimState.CONFIRMED if value == CONFIRMED else ClaimState.IN_FLIGHT


async def wait_for_state(claims: RedisClaims, key: str, within: float) -> ClaimState | None:
    """Poll ``key`` until it is no longer in flight, for at most ``within`` seconds.

    Returns the state it reached (``IN_FLIGHT`` if still there at the deadline); raises
    :class:`StoreUnavailable`.
    """
    deadline = time.monotonic() + within
    pause = _FIRST_POLL_SECONDS
    while True:
        state = await claims.state(key)
        left = deadline - time.monotonic()
        if state is not ClaimState.IN_FLIGHT or left <= 0:
            return state
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, _LONGEST_POLL_SECONDS)


class RedisStore:
    """The bridge's shared store: ids claimed while publishing, confirmed for the window.

    Knows when Redis is down: the first failure logs one line and opens the circuit, so
    requests stop waiting on Redis at once; a probe every half second closes it again
    (and logs one line) as soon as Redis accepts a write.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str,
        window_seconds: float,
        claim_ttl_seconds: float,
        timeout: float,
        location: str,
        while_down: str,
        observe_seconds: Callable[[float], None] = lambda _seconds: None,
    ) -> None:
        self._claims = RedisClaims(PipelinedCommands(client, timeout=timeout), prefix=prefix)
        self._window_ms = round(window_seconds * 1000)
        self._claim_ttl_ms = round(claim_ttl_seconds * 1000)
        self._location = location
        self._while_down = while_down
        self._observe_seconds = observe_seconds
        self._probe_key = f"probe:{socket.gethostname()}:{os.getpid()}"
        self._available = True
        self._probe: asyncio.Task[None] | None = None

    @property
    def available(self) -> bool:
        return self._available

    async def start(self) -> None:
        try:
            await self._write_probe()
        except StoreUnavailable as error:
            self._went_down(error)
        else:
            logger.info("deduplicating across pods in Redis at %s", self._location)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self._claims.commands.close()

    async def claim(self, key: str) -> Claim:
        if not self._available:
            raise StoreUnavailable("known to be down")
        with self._call():
            return await self._claims.claim(key, self._claim_ttl_ms)

    async def confirm(self, claim: Claim) -> None:
        if self._available:
            with contextlib.suppress(StoreUnavailable), self._call():
                await self._claims.confirm(claim.key, self._window_ms)

    async def release(self, claim: Claim) -> None:
        # While Redis is down the claim cannot be dropped; it expires after its TTL.
        if self._available:
            with contextlib.suppress(StoreUnavailable), self._call():
                await self._claims.release(claim)

    async def wait_confirmed(self, key: str, within: float) -> bool:
        try:
            with self._call():
                state = await wait_for_state(self._claims, key, within)
        except StoreUnavailable:
            return False
        return state is ClaimState.CONFIRMED

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """Time one store call; a failure opens the circuit."""
        started = time.monotonic()
        try:
            yield
        except StoreUnavailable as error:
            self._went_down(error)
            raise
        finally:
            self._observe_seconds(time.monotonic() - started)

    async def _write_probe(self) -> None:
        # A write, not PING: a replica (READONLY) or a full Redis (OOM) answers PING too.
        await self._claims.write_probe(self._probe_key)

    def _went_down(self, error: StoreUnavailable) -> None:
        if not self._available:
            return
        self._available = False
        logger.error(
            "deduplication store at %s unavailable (%s): %s until it answers",
            self._location,
            error,
            self._while_down,
        )
        self._probe = asyncio.get_running_loop().create_task(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        while True:
            try:
                await self._write_probe()
            except StoreUnavailable:
                await asyncio.sleep(PROBE_INTERVAL_SECONDS)
            else:
                break
        self._available = True
        self._probe = None
        logger.warning("deduplication store at %s available again", self._location)
