"""Publishing each ``webhook-id`` once per process.

OpenAI retries a delivery it did not see answered, so the same signed webhook
can arrive twice: concurrently (a retry racing a slow confirm) or again a
moment later. Copies arriving while the first publish is in flight wait for
its outcome; copies arriving within the window after a confirmed publish are
answered from memory. The window is per process and bounded in size and age;
across pods, consumers deduplicate on ``message_id``.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class FirstCopyAbandoned(Exception):
    """The copy being waited on was cancelled before it finished."""


class Deduplicator(Generic[T]):
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
        self._in_flight: dict[str, asyncio.Future[T]] = {}
        # Only strings and floats, which the garbage collector does not need to follow.
        self._expiry_by_key: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry_by_key)

    async def once(self, key: str, action: Callable[[], Awaitable[T]]) -> T | None:
        """Run ``action`` unless ``key`` ran recently or is running.

        Returns the action's result, or ``None`` for a duplicate: a copy of ``key``
        succeeded within the window, or the copy running now succeeded. A failed
        action is not remembered, so a retry runs it again; copies waiting on it fail
        with the same error.
        """
        now = self._clock()
        self._forget_expired(now)
        if key in self._expiry_by_key:
            return None
        running = self._in_flight.get(key)
        if running is not None:
            await asyncio.shield(running)
            return None

        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            result = await action()
        except BaseException as error:
            future.set_exception(
                error if isinstance(error, Exception) else FirstCopyAbandoned(key)
            )
            future.exception()  # retrieved here, so a copy-less failure is not reported as lost
            raise
        else:
            future.set_result(result)
            self._remember(key, self._clock())
            return result
        finally:
            del self._in_flight[key]

    def _forget_expired(self, now: float) -> None:
        expiries = self._expiry_by_key
        while expiries:
            oldest_key = next(iter(expiries))
            if expiries[oldest_key] > now:
                break
            del expiries[oldest_key]

    def _remember(self, key: str, now: float) -> None:
        if self._max_ids == 0 or self._window == 0:
            return
        self._expiry_by_key[key] = now + self._window
        self._expiry_by_key.move_to_end(key)
        while len(self._expiry_by_key) > self._max_ids:
            self._expiry_by_key.popitem(last=False)
