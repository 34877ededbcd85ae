"""The adaptive in-flight limit: how it moves with latency, and that it never loses a slot."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from bridge.limiter import EPOCH_CONFIRMS, EPOCH_SECONDS, AdaptiveLimit


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def limit_with(clock: FakeClock, *, initial: int = 32, maximum: int = 1024) -> AdaptiveLimit:
    return AdaptiveLimit(initial=initial, minimum=8, maximum=maximum, clock=clock)


def run_epochs(
    limit: AdaptiveLimit,
    clock: FakeClock,
    latency: Callable[[int], float],
    *,
    epochs: int,
    demand: int = 100_000,
) -> list[int]:
    """Run epochs in which ``demand`` publishes want a slot and each confirm takes
    ``latency(limit)`` seconds; return the limit after each epoch."""
    limits = []

    def fill() -> None:
        while limit.in_flight < demand and limit.try_acquire():
            pass

    for _ in range(epochs):
        fill()
        for confirm in range(EPOCH_CONFIRMS):
            if confirm == EPOCH_CONFIRMS - 1:
                clock.now += EPOCH_SECONDS * 1.001  # past it, whatever the rounding
            limit.release(latency(limit.limit))
            fill()
        limits.append(limit.limit)
    return limits


def saturated(confirms_per_second: float, pipe_seconds: float) -> Callable[[int], float]:
    """A broker (or process) that does ``confirms_per_second`` whatever is in flight."""
    return lambda in_flight: max(pipe_seconds, in_flight / confirms_per_second)


def test_a_steady_latency_lets_the_limit_grow_to_the_maximum() -> None:
    clock = FakeClock()
    limit = limit_with(clock)
    limits = run_epochs(limit, clock, lambda _in_flight: 0.025, epochs=600)
    assert limits[-1] == 1024


def test_a_saturated_broker_stops_the_limit_near_its_knee() -> None:
    clock = FakeClock()
    limit = limit_with(clock)
    # The knee: 6,000 confirms/s over a 5 ms pipe keep 30 in flight busy.
    limits = run_epochs(limit, clock, saturated(6000, 0.005), epochs=100)
    assert all(30 <= value <= 90 for value in limits[-50:])


def test_more_in_flight_that_pays_in_throughput_keeps_the_limit_growing() -> None:
    clock = FakeClock()
    limit = limit_with(clock)
    # Twice the publishes in flight, each waits 40 % longer: 1.4x the confirms per second.
    limits = run_epochs(limit, clock, lambda in_flight: 0.002 * in_flight**0.5, epochs=600)
    assert limits[-1] > 500


def test_a_latency_jump_brings_the_limit_down_and_it_recovers_later() -> None:
    clock = FakeClock()
    limit = limit_with(clock, initial=400)
    run_epochs(limit, clock, lambda _in_flight: 0.004, epochs=20)
    before = limit.limit
    lowered = run_epochs(limit, clock, lambda _in_flight: 0.040, epochs=10)[-1]
    assert lowered < before / 2
    # The baseline creeps up to the new latency, and the limit follows.
    recovered = run_epochs(limit, clock, lambda _in_flight: 0.040, epochs=1500)[-1]
    assert recovered > 4 * lowered


def test_a_limit_not_reached_does_not_move() -> None:
    clock = FakeClock()
    limit = limit_with(clock)
    limits = run_epochs(limit, clock, lambda _in_flight: 0.002, epochs=100, demand=12)
    assert set(limits) == {32}


def test_a_timeout_halves_the_limit() -> None:
    limit = limit_with(FakeClock(), initial=100)
    limit.timed_out()
    assert limit.limit == 50


def test_the_limit_stays_within_its_bounds() -> None:
    clock = FakeClock()
    limit = limit_with(clock, maximum=50)
    run_epochs(limit, clock, lambda _in_flight: 0.001, epochs=100)
    assert limit.limit == 50
    for _ in range(10):
        limit.timed_out()
    assert limit.limit == 8


def test_changes_are_reported() -> None:
    clock = FakeClock()
    seen: list[int] = []
    limit = AdaptiveLimit(initial=32, minimum=8, maximum=40, on_change=seen.append, clock=clock)
    run_epochs(limit, clock, lambda _in_flight: 0.01, epochs=100)
    assert seen[0] == 32
    assert seen[-1] == 40


def test_bounds_must_make_sense() -> None:
    with pytest.raises(ValueError, match="minimum"):
        AdaptiveLimit(initial=1, minimum=10, maximum=5)


async def test_waiters_get_slots_in_arrival_order() -> None:
    loop = asyncio.get_running_loop()
    limit = AdaptiveLimit(initial=1, minimum=1, maximum=1)
    assert limit.try_acquire()
    served: list[int] = []

    async def take(number: int) -> None:
        await limit.wait(loop, loop.time() + 10)
        served.append(number)
        await asyncio.sleep(0)
        limit.release(0.001)

    waiters = [asyncio.create_task(take(number)) for number in range(5)]
    await asyncio.sleep(0)
    assert limit.waiting == 5
    assert not limit.try_acquire()  # a free slot goes to the queue first, never past it
    limit.release(0.001)
    await asyncio.gather(*waiters)
    assert served == [0, 1, 2, 3, 4]
    assert limit.in_flight == 0


async def test_a_wait_past_its_deadline_raises_timeout_and_leaves_the_line() -> None:
    loop = asyncio.get_running_loop()
    limit = AdaptiveLimit(initial=1, minimum=1, maximum=1)
    assert limit.try_acquire()
    with pytest.raises(TimeoutError):
        await limit.wait(loop, loop.time() + 0.05)
    assert limit.waiting == 0
    limit.release(None)
    assert limit.in_flight == 0
    assert limit.try_acquire()


async def test_a_cancelled_waiter_gives_back_a_slot_handed_to_it() -> None:
    loop = asyncio.get_running_loop()
    limit = AdaptiveLimit(initial=1, minimum=1, maximum=1)
    assert limit.try_acquire()
    waiter = asyncio.create_task(limit.wait(loop, loop.time() + 10))
    await asyncio.sleep(0)
    limit.release(None)  # hands the slot to the waiter ...
    waiter.cancel()  # ... which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limit.in_flight == 0
    assert limit.waiting == 0


async def test_a_cancelled_waiter_in_line_is_not_served() -> None:
    loop = asyncio.get_running_loop()
    limit = AdaptiveLimit(initial=1, minimum=1, maximum=1)
    assert limit.try_acquire()
    first = asyncio.create_task(limit.wait(loop, loop.time() + 10))
    second = asyncio.create_task(limit.wait(loop, loop.time() + 10))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    limit.release(None)
    await second
    assert limit.in_flight == 1


def test_a_quiet_spell_does_not_make_a_busy_broker_look_slow() -> None:
    clock = FakeClock()
    limit = limit_with(clock)
    busy = saturated(8000, 0.004)  # a quorum queue: its confirms batch, 4 ms at least
    settled = run_epochs(limit, clock, busy, epochs=100, demand=256)[-1]
    run_epochs(limit, clock, lambda _in_flight: 0.0005, epochs=100, demand=1)
    assert min(run_epochs(limit, clock, busy, epochs=100, demand=256)) >= settled * 0.7


def test_one_lucky_epoch_does_not_hold_the_limit_down() -> None:
    clock = FakeClock()
    limit = limit_with(clock)
    busy = saturated(8000, 0.004)
    settled = run_epochs(limit, clock, busy, epochs=100, demand=256)[-1]
    # A quorum queue's confirms come in batches: now and then one epoch is far quicker.
    run_epochs(limit, clock, lambda _in_flight: 0.0004, epochs=1, demand=256)
    assert min(run_epochs(limit, clock, busy, epochs=100, demand=256)) >= settled * 0.7
