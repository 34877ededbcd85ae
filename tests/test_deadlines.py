"""One timer for every deadline: what is pending at its deadline is cancelled, nothing early."""

from __future__ import annotations

import asyncio

from bridge.deadlines import Deadlines


async def test_what_is_still_pending_at_its_deadline_is_cancelled() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    met, missed = loop.create_future(), loop.create_future()
    deadlines.cancel_at(loop.time() + 0.05, met)
    deadlines.cancel_at(loop.time() + 0.05, missed)
    met.set_result(None)
    await asyncio.sleep(0.1)
    assert met.result() is None
    assert missed.cancelled()
    assert len(deadlines) == 0


async def test_nothing_is_cancelled_before_its_deadline() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    started = loop.time()
    soon, later = loop.create_future(), loop.create_future()
    deadlines.cancel_at(started + 0.05, soon)
    deadlines.cancel_at(started + 0.3, later)
    await asyncio.wait({soon}, timeout=5)
    assert soon.cancelled()
    assert not later.done()
    await asyncio.wait({later}, timeout=5)
    assert later.cancelled()
    assert loop.time() >= started + 0.3


async def test_futures_done_in_time_are_forgotten() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    for _ in range(1000):
        future = loop.create_future()
        deadlines.cancel_at(loop.time() + 60, future)
        future.set_result(None)
    assert len(deadlines) == 1
