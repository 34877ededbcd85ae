"""Cancelling what is still pending at its deadline, with one loop timer for all of it.

Every publish has a deadline, and nearly every one is met. A timer per publish (an
``asyncio.timeout``, or a ``call_at`` and its cancel) costs more than the rest of
the publish's bookkeeping; here a publish only joins a queue, and one timer, set for
the earliest deadline, cancels whatever is still pending when it fires.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class Deadlines:
    """Futures to cancel if still pending at their deadlines (``loop.time()`` values).

    Deadlines are expected in arrival order, each its own start plus one timeout, so the
    earliest is always first; one out of order is cancelled late, once those before it
    are done or due, never early.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def cancel_at(self, deadline: float, future: asyncio.Future[Any]) -> None:
        pending = self._pending
        while pending and pending[0][1].done():
            pending.popleft()
        pending.append((deadline, future))
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._cancel_due)

    def _cancel_due(self) -> None:
        pending = self._pending
        now = self._loop.time()
        while pending and (pending[0][0] <= now or pending[0][1].done()):
            pending.popleft()[1].cancel()
        self._timer = self._loop.call_at(pending[0][0], self._cancel_due) if pending else None
