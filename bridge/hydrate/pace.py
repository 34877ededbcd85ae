"""One pace for every call a worker makes: at most so many a second, and none while the
API asked to wait.

OpenAI's rate limits are per organization and project, not per request: when one call
is answered 429, the next ones would be too. So a ``Retry-After`` pauses every call of
the worker, not only the one that was refused, and the calls resume at the configured
rate.
"""

from __future__ import annotations

import asyncio


class Pace:
    """Hands out call slots ``1 / rate`` seconds apart, none before a pause ends."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._interval = 1.0 / rate
        self._next_slot = 0.0
        self._paused_until = 0.0

    async def slot(self) -> float:
        """Wait for this call's slot; return how long pauses (429s) held it back.

        A pause that begins while the call waits for its slot holds it back too."""
        loop = asyncio.get_running_loop()
        held_by_pauses = 0.0
        while True:
            now = loop.time()
            if self._paused_until > now:
                held_by_pauses += self._paused_until - now
            slot = max(now, self._next_slot, self._paused_until)
            self._next_slot = slot + self._interval
            if slot > now:
                await asyncio.sleep(slot - now)
            if self._paused_until <= loop.time():
                return held_by_pauses

    def pause(self, seconds: float) -> None:
        """Give no slot for ``seconds`` from now (a 429's ``Retry-After``)."""
        until = asyncio.get_running_loop().time() + seconds
        if until > self._paused_until:
            self._paused_until = until
            self._next_slot = max(self._next_slot, until)
