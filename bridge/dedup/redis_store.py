"""The bridge's deduplication store in the shared Redis (one, Sentinel-managed, or a cluster).

What it writes is :mod:`bridge.dedup.redis_claims`'s layout; how commands reach Redis is
:mod:`bridge.dedup.redis_pipeline`'s. Here: the circuit that stops requests waiting on a
Redis known to be down, and the waiting on another pod's copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from bridge.dedup.redis_claims import RedisClaims
from bridge.dedup.redis_pipeline import Commands
from bridge.dedup.store import Claim, ClaimState, StoreUnavailable

logger = logging.getLogger(__name__)

PROBE_INTERVAL_SECONDS = 0.5
_FIRST_POLL_SECONDS = 0.01
_LONGEST_POLL_SECONDS = 0.1


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


class _StoreCall:
    """Times one store call; a failure opens the circuit. (A class: on every claim, a
    generator-based context manager would cost more than the rest of the bookkeeping.)"""

    __slots__ = ("started", "store")

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.started = time.monotonic()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        self.ended(error)

    def ended(self, error: BaseException | None) -> None:
        if isinstance(error, StoreUnavailable):
            self.store._went_down(error)
        self.store._observe_seconds(time.monotonic() - self.started)


class RedisStore:
    """The bridge's shared store: ids claimed while publishing, confirmed for the window.

    Knows when Redis is down: the first failure logs one line and opens the circuit, so
    requests stop waiting on Redis at once; a probe every half second closes it again
    (and logs one line) as soon as Redis accepts a write.
    """

    def __init__(
        self,
        commands: Commands,
        *,
        prefix: str,
        window_seconds: float,
        claim_ttl_seconds: float,
        timeout: float,
        location: str,
        while_down: str,
        observe_seconds: Callable[[float], None] = lambda _seconds: None,
    ) -> None:
        self._claims = RedisClaims(commands, prefix=prefix, window_seconds=window_seconds)
        self._claim_ttl_ms = round(claim_ttl_seconds * 1000)
        self._location = location
        self._while_down = while_down
        self._observe_seconds = observe_seconds
        self._available = True
        self._probe: asyncio.Task[None] | None = None
        self._marks: set[asyncio.Future[None]] = set()

    @property
    def available(self) -> bool:
        return self._available

    async def start(self) -> None:
        try:
            await self._prepare()
        except StoreUnavailable as error:
            self._went_down(error)
        else:
            logger.info("deduplicating across pods in Redis at %s", self._location)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        # Requests do not wait for their marks: let those sent land (each within the
        # timeout) before the connection goes.
        await asyncio.gather(*self._marks)
        self._available = False  # what closing fails is no outage to report
        await self._claims.commands.close()

    async def claim(self, key: str) -> Claim:
        if not self._available:
            raise StoreUnavailable("known to be down")
        with _StoreCall(self):
            return await self._claims.claim(key, self._claim_ttl_ms)

    def confirm(self, claim: Claim) -> asyncio.Future[None]:
        landed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._available:
            answer = self._claims.confirm(claim.key, claim.token)
            answer.add_done_callback(functools.partial(_confirmed, _StoreCall(self), landed))
            self._marks.add(landed)
            landed.add_done_callback(self._marks.discard)
        else:
            landed.set_result(None)
        return landed

    async def release(self, claim: Claim) -> None:
        # While Redis is down the claim cannot be dropped; it expires after its TTL.
        if self._available:
            with contextlib.suppress(StoreUnavailable), _StoreCall(self):
                await self._claims.release(claim)

    async def wait_confirmed(self, key: str, within: float) -> bool:
        try:
            with _StoreCall(self):
                state = await wait_for_state(self._claims, key, within)
        except StoreUnavailable:
            return False
        return state is ClaimState.CONFIRMED

    async def _prepare(self) -> None:
        await self._claims.write_probe()
        await self._claims.start()

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
                await self._prepare()
            except StoreUnavailable:
                await asyncio.sleep(PROBE_INTERVAL_SECONDS)
            else:
                break
        self._available = True
        self._probe = None
        logger.warning("deduplication store at %s available again", self._location)


def _confirmed(call: _StoreCall, landed: asyncio.Future[None], answer: asyncio.Future[Any]) -> None:
    call.ended(None if answer.cancelled() else answer.exception())
    landed.set_result(None)
