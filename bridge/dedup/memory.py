"""The in-process store: confirmed ids remembered by this process only, bounded in size and age."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from bridge.dedup.store import Claim, ClaimState

GENERATIONS = 8
"""Ids are kept in this many generations, and forgotten a generation at a time."""


class _Generation:
    """The ids confirmed during one stretch of time, with when each expires."""

    __slots__ = ("expiry_by_key", "last_expiry", "opened_at")

    def __init__(self, opened_at: float) -> None:
        self.expiry_by_key: dict[str, float] = {}
        self.opened_at = opened_at
        self.last_expiry = opened_at


class InProcessStore:
    """Confirmed ids in this process's memory; forgotten on restart and unknown to other pods.

    Claims are not recorded: within one process the :class:`~bridge.dedup.Deduplicator`
    already holds every copy of an id in flight, and there is no other process to tell.

    The ids live in generations (each an eighth of the window, or of ``max_ids``) that
    are dropped whole once their last id expired, or the oldest first when there are
    more than ``max_ids``: a dictionary that only ever loses its oldest entries and gains
    new ones fragments the heap it lives in (a single ordered one grew by 80 % over a
    million ids), while a generation is built, then freed at once.
    """

    available = True

    def __init__(
        self,
        *,
        window_seconds: float,
        max_ids: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window = window_seconds
        self._max_ids = max_ids
        self._clock = clock
        self._generation_span = window_seconds / GENERATIONS
        self._generation_size = max(1, max_ids // GENERATIONS)
        self._generations: deque[_Generation] = deque()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def claim(self, key: str) -> Claim:
        return Claim(key, ClaimState.CONFIRMED if self._remembers(key) else ClaimState.NEW)

    def confirm(self, claim: Claim) -> asyncio.Future[None]:
        self._remember(claim.key)
        landed = asyncio.get_running_loop().create_future()
        landed.set_result(None)
        return landed

    def _remember(self, key: str) -> None:
        if self._max_ids == 0 or self._window == 0:
            return
        now = self._clock()
        generations = self._generations
        if (
            not generations
            or len(generations[-1].expiry_by_key) >= self._generation_size
            or now - generations[-1].opened_at >= self._generation_span
        ):
            generations.append(_Generation(now))
        current = generations[-1]
        if key not in current.expiry_by_key:
            self._count += 1
        current.expiry_by_key[key] = current.last_expiry = now + self._window
        self._forget_expired(now)

    async def release(self, claim: Claim) -> None:
        pass

    async def wait_confirmed(self, key: str, within: float) -> bool:
        return self._remembers(key)

    def _remembers(self, key: str) -> bool:
        now = self._clock()
        self._forget_expired(now)
        for generation in self._generations:
            expiry = generation.expiry_by_key.get(key)
            if expiry is not None and expiry > now:
                return True
        return False

    def _forget_expired(self, now: float) -> None:
        generations = self._generations
        while generations and (generations[0].last_expiry <= now or self._count > self._max_ids):
            self._count -= len(generations.popleft().expiry_by_key)
