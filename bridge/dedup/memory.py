"""The in-process store: confirmed ids remembered by this process only, bounded in size and age."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from bridge.dedup.store import Claim, ClaimState


class InProcessStore:
    """Confirmed ids in this process's memory; forgotten on restart and unknown to other pods.

    Claims are not recorded: within one process the :class:`~bridge.dedup.Deduplicator`
    already holds every copy of an id in flight, and there is no other process to tell.
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
        # Only strings and floats, which the garbage collector does not need to follow.
        self._expiry_by_key: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry_by_key)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def claim(self, key: str) -> Claim:
        return Claim(key, ClaimState.CONFIRMED if self._remembers(key) else ClaimState.NEW)

    async def confirm(self, claim: Claim) -> None:
        if self._max_ids == 0 or self._window == 0:
            return
        expiries = self._expiry_by_key
        expiries[claim.key] = self._clock() + self._window
        expiries.move_to_end(claim.key)
        while len(expiries) > self._max_ids:
            expiries.popitem(last=False)

    async def release(self, claim: Claim) -> None:
        pass

    async def wait_confirmed(self, key: str, within: float) -> bool:
        return self._remembers(key)

    def _remembers(self, key: str) -> bool:
        now = self._clock()
        expiries = self._expiry_by_key
        # Every entry lives equally long and confirming moves it last, so the oldest come first.
        while expiries:
            oldest_key = next(iter(expiries))
            if expiries[oldest_key] > now:
                break
            del expiries[oldest_key]
        return key in expiries
