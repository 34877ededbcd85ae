"""Deduplication through Redis Sentinel: the bridge follows a failover without a restart.

One master, one replica and three Sentinels of the test's own; the master is SIGKILLed
(its unreplicated writes are lost) or handed over with ``SENTINEL FAILOVER``, under load.
Nothing answered 2xx may be missing from the queue. The gap in 2xx answers and the
duplicates let through are printed (``-s``) for the documentation; they are not asserted:
they depend on timing.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import aiohttp
import pytest

from bridge.dedup.idempotency import RedisIdempotencyStore
from bridge.dedup.store import ClaimState, StoreUnavailable
from tests.conftest import BridgeProcess, Broker, Signer
from tests.history import OpenAILikeSender, check, make_sender
from tests.redis_support import dedup_bridge_under_load
from tests.redis_topologies import SentinelSet, sentinel_set

__all__ = ["make_sender", "sentinel_set"]  # fixtures used by the tests below

pytestmark = [pytest.mark.redis]


async def test_the_consumer_store_follows_the_master_the_sentinels_name(
    sentinel_set: SentinelSet,
) -> None:
    store = RedisIdempotencyStore(sentinel_set.url, namespace="sentinel-test", timeout=1.0)
    try:
        assert await store.claim("msg_before") is ClaimState.NEW
        await store.done("msg_before")
        assert await store.claim("msg_before") is ClaimState.CONFIRMED
        old_master = sentinel_set.master_port()
        await asyncio.to_thread(sentinel_set.failover)
        await asyncio.to_thread(sentinel_set.wait_for_master_other_than, old_master)
        deadline = time.monotonic() + 20
        while True:  # the first command after the switch fails (READONLY); the next reconnects
            try:
                state = await store.claim("msg_after")
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the store did not find the new master"
                await asyncio.sleep(0.2)
        assert state is ClaimState.NEW
        assert await store.claim("msg_before") is ClaimState.CONFIRMED  # replicated before
    finally:
        await store.close()


@pytest.mark.broker
@pytest.mark.parametrize("fault", ["sigkill", "sentinel-failover"])
async def test_a_master_lost_under_load_loses_nothing_acknowledged(
    fault: str,
    start_bridge: Callable[..., BridgeProcess],
    broker: Broker,
    signer: Signer,
    sentinel_set: SentinelSet,
    make_sender: Callable[..., OpenAILikeSender],
) -> None:
    _, queue, sender = await dedup_bridge_under_load(
        start_bridge,
        broker,
        make_sender,
        signer,
        dedup_url=sentinel_set.url,
        on_error="reject",
        accepted=100,
    )

    old_master = sentinel_set.master_port()
    fault_at = time.monotonic()
    if fault == "sigkill":
        server = sentinel_set.server_on(old_master)
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)
    else:
        await asyncio.to_thread(sentinel_set.failover)
    await asyncio.to_thread(sentinel_set.wait_for_master_other_than, old_master)
    await sender.accept_more(100)  # no restart needed
    history = await sender.finish()
    # OpenAI delivers again what it saw no answer to: each id answered in the last two
    # seconds before the fault, once more. Those whose confirmation the new master never
    # received are published again: the duplicates a failover lets through.
    again = [
        (webhook_id, history.bodies[webhook_id])
        for webhook_id in history.accepted_answered_between(fault_at - 2, fault_at)
    ]
    async with aiohttp.ClientSession() as session:
        for webhook_id, body in again:
            await sender.deliver(session, webhook_id, body)

    in_queue = [message.message_id or "" for message in await broker.drain(queue)]
    verdict = check(f"sentinel {fault}", history, in_queue)
    duplicates = verdict.duplicates
    print(
        f"\nsentinel {fault}: first 2xx to a request sent after the fault "
        f"{history.first_2xx_sent_after(fault_at):.2f} s after it, longest gap between 2xx "
        f"answers {history.longest_gap_after(fault_at):.2f} s, "
        f"{duplicates} of {len(again)} ids delivered again were published again "
        f"({len(set(in_queue))} ids, {history.statuses[503]} 503s)"
    )
