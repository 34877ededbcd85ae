"""Redis stopped and started under load, in both ``BRIDGE_DEDUP_ON_ERROR`` modes.

Each test runs its own ``redis-server`` on a free port and stops it hard (as a failover
that lost recent writes would look): nothing that got a 2xx may be missing from the
queue, and in ``reject`` mode nothing gets a 2xx while Redis is down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import pytest

from tests.conftest import BridgeProcess, Broker, Signer
from tests.history import OpenAILikeSender, check
from tests.redis_support import PrivateRedis, dedup_bridge_under_load, private_redis

__all__ = ["private_redis"]  # fixtures used by the tests below

pytestmark = [pytest.mark.broker, pytest.mark.disruptive]

DOWN_SECONDS = 3.0


async def readiness(pod: BridgeProcess) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{pod.port}/readyz") as response,
    ):
        return response.status


async def wait_for_readiness(pod: BridgeProcess, status: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while await readiness(pod) != status:
        assert time.monotonic() < deadline, f"/readyz did not turn {status}"
        await asyncio.sleep(0.05)


def state_changes(pod: BridgeProcess) -> list[str]:
    return [
        line for line in pod.log_path.read_text().splitlines() if "deduplication store at" in line
    ]


async def wait_for_log_lines(pod: BridgeProcess, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(state_changes(pod)) < count:
        assert time.monotonic() < deadline, state_changes(pod)
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("mode", ["publish", "reject"])
async def test_redis_stopped_and_started_under_load_loses_nothing(
    mode: str,
    start_bridge: Callable[..., BridgeProcess],
    broker: Broker,
    signer: Signer,
    private_redis: PrivateRedis,
    make_sender: Callable[..., OpenAILikeSender],
    scenario: str,
) -> None:
    pod, queue, sender = await dedup_bridge_under_load(
        start_bridge,
        broker,
        make_sender,
        signer,
        dedup_url=private_redis.url,
        on_error=mode,
        accepted=50,
    )

    private_redis.stop()
    if mode == "reject":
        await wait_for_readiness(pod, 503)
        await asyncio.sleep(0.3)  # copies that claimed before the stop finish their publish
        accepted_while_down = len(sender.history.accepted)
        unavailable_before = sender.history.statuses[503]
        await asyncio.sleep(DOWN_SECONDS)
        assert len(sender.history.accepted) == accepted_while_down, "a 2xx while Redis was down"
        assert sender.history.statuses[503] > unavailable_before
    else:
        accepted_at_stop = len(sender.history.accepted)
        await asyncio.sleep(DOWN_SECONDS)
        assert await readiness(pod) == 200
        assert len(sender.history.accepted) > accepted_at_stop + 20, "publishing goes on unchecked"

    private_redis.start()
    await wait_for_log_lines(pod, 2)  # the probe found Redis again
    await wait_for_readiness(pod, 200)
    accepted_after_restart = len(sender.history.accepted)
    await sender.wait_accepted(accepted_after_restart + 50)
    history = await sender.finish()

    in_queue = [message.message_id or "" for message in await broker.drain(queue)]
    verdict = check(scenario, history, in_queue)
    if mode == "reject":
        assert verdict.duplicates == 0, "reject mode never publishes unchecked"
    changes = state_changes(pod)
    assert len(changes) == 2, changes  # one line down, one line back: not one per request
    assert "unavailable" in changes[0]
    assert "available again" in changes[1]
