"""How many publishes may wait for their confirms at once: a limit that follows the broker.

A fixed number fits one broker. Too low, and a broker whose confirms take 20 to 30 ms
(a classic queue under load, a broker across a network) caps the process at
limit / latency publishes per second, whatever its CPU could do. Too high, and the
broker queues what it cannot take yet: past 32 unconfirmed commands per channel a
quorum queue puts the connection under flow control, every extra publish in flight
only waits longer, in bursts, and the slowest requests get slower (at 256 connections
the benchmark's p99 doubled without a limit). Waiting here, in order, is fairer.

So the limit follows the confirm latency, as the gradient limiter of Netflix's
concurrency-limits does. Each epoch (a tenth of a second, and 32 confirms at least)
compares the mean time a publish held its slot with a baseline: the lowest mean over
the last ``BASELINE_EPOCHS`` epochs in which the limit held publishes back (a lone
publish's latency is no measure of a busy broker's, and one lucky epoch of a quorum
queue's batched confirms no measure of its usual pace), which creeps up by 2 % a second
so that a broker that became slower for good (a failover to a farther node) is accepted
within half a minute. While an epoch is
within ``TOLERANCE`` times the baseline the limit grows by about its square root;
beyond, it shrinks in proportion, by at most half per epoch. Through more publishes
in flight a classic queue gets faster overall while each confirm takes longer, so
the tolerance is wide enough for that (twice the baseline); a saturated broker or
process, where latency only grows with the limit, stops it near the knee. An epoch
in which the limit held nothing back changes nothing (there is no evidence either
way), and a publish that timed out halves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable

from bridge.deadlines import Deadlines

TOLERANCE = 2.0
"""An epoch this much slower than the baseline means the broker is queueing."""
SMOOTHING = 0.2
"""How far the limit moves towards each epoch's verdict."""
MAX_DECREASE = 0.5
"""The most one epoch's verdict takes off: half the limit."""
BASELINE_CREEP_PER_SECOND = 0.02
BASELINE_EPOCHS = 5
"""The baseline is taken from this many bound epochs together (half a second at least)."""
EPOCH_SECONDS = 0.1
EPOCH_CONFIRMS = 32
"""An epoch closes once it is this long and holds this many confirms, whichever is later."""


class AdaptiveLimit:
    """A FIFO-fair limit on work in flight, adapted to how long each piece holds its slot.

    ``try_acquire`` takes a slot at once if one is free; otherwise ``wait`` queues the
    caller, in arrival order, until a slot frees or its deadline passes. Every slot
    taken is given back with ``release``, with the seconds it was held, or ``None`` when
    the work was not confirmed (which says nothing of the broker's latency).
    """

    def __init__(
        self,
        *,
        initial: int,
        minimum: int,
        maximum: int,
        on_change: Callable[[int], None] = lambda _limit: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError(f"need 1 <= minimum ({minimum}) <= maximum ({maximum})")
        self._minimum = minimum
        self._maximum = maximum
        self._estimate = float(min(max(initial, minimum), maximum))
        self._limit = int(self._estimate)
        self._on_change = on_change
        self._clock = clock
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._deadlines: Deadlines | None = None
        self._epoch_started = clock()
        self._epoch_confirms = 0
        self._epoch_held = 0.0
        self._epoch_bound = False
        self._baseline: float | None = None
        self._recent_means: deque[float] = deque(maxlen=BASELINE_EPOCHS)
        on_change(self._limit)

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        if self.in_flight >= self._limit or self._waiters:
            self._epoch_bound = True
            return False
        self.in_flight += 1
        if self.in_flight == self._limit:
            self._epoch_bound = True
        return True

    async def wait(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """Wait in line for a slot until ``deadline`` (``loop.time()``), or raise TimeoutError.

        Callers with one timeout each, from the moment they ask, keep the deadlines in order.
        """
        if self._deadlines is None:
            self._deadlines = Deadlines(loop)
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        self._deadlines.cancel_at(deadline, waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            else:  # the slot was handed over just as this task was cancelled
                self.release(None)
            task = asyncio.current_task()
            if loop.time() >= deadline and not (task is not None and task.cancelling()):
                raise TimeoutError from None
            raise

    def release(self, held_seconds: float | None) -> None:
        self.in_flight -= 1
        if held_seconds is not None:
            self._epoch_held += held_seconds
            self._epoch_confirms += 1
            if self._epoch_confirms >= EPOCH_CONFIRMS:
                now = self._clock()
                if now - self._epoch_started >= EPOCH_SECONDS:
                    self._close_epoch(now)
        self._hand_over()

    def timed_out(self) -> None:
        """A publish got no confirm in time: whatever was in flight was too much."""
        self._set(self._estimate * MAX_DECREASE)

    def _hand_over(self) -> None:
        waiters = self._waiters
        while waiters and self.in_flight < self._limit:
            waiter = waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    def _close_epoch(self, now: float) -> None:
        mean = self._epoch_held / self._epoch_confirms
        elapsed = now - self._epoch_started
        bound = self._epoch_bound or bool(self._waiters)
        self._epoch_started = now
        self._epoch_confirms = 0
        self._epoch_held = 0.0
        self._epoch_bound = False
        if not bound or mean <= 0:
            return
        # Only epochs the limit held back say what the broker does under load: below it,
        # a lone publish's latency would set a baseline no busy broker ever meets.
        recent = self._recent_means
        recent.append(mean)
        recent_mean = sum(recent) / len(recent)
        if self._baseline is None or len(recent) < BASELINE_EPOCHS:
            baseline = recent_mean
        else:
            baseline = min(recent_mean, self._baseline * (1 + BASELINE_CREEP_PER_SECOND * elapsed))
        self._baseline = baseline
        gradient = max(MAX_DECREASE, min(1.0, TOLERANCE * baseline / mean))
        verdict = self._estimate * gradient + self._estimate**0.5
        self._set(self._estimate * (1 - SMOOTHING) + verdict * SMOOTHING)

    def _set(self, estimate: float) -> None:
        self._estimate = min(max(estimate, self._minimum), self._maximum)
        limit = int(self._estimate)
        if limit != self._limit:
            self._limit = limit
            self._on_change(limit)
            self._hand_over()
