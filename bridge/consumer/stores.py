"""Idempotency stores for consumers: claim each ``message_id`` before handling it."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from bridge.dedup.store import ClaimState


class IdempotencyStore(Protocol):
    """Claims each ``message_id`` before it is handled, and remembers it once handled.

    The same ``message_id`` can arrive twice (OpenAI delivered the webhook again and
    the bridge had no shared deduplication store, or a 503 whose publish was stored
    anyway). ``claim`` answers ``NEW`` (handle it; then ``done`` or ``release``),
    ``CONFIRMED`` (handled already: skipped) or ``IN_FLIGHT`` (another replica is
    handling it: handed back to look again later). Replicas sharing a queue need a store
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
