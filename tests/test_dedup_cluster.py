"""Deduplication across a Redis Cluster of three masters (a replica each), started by the tests.

Two bridge processes share the cluster; the ids' groups land on every master, and a
master SIGKILLed under load is replaced by its replica without losing anything answered
2xx. The gap in 2xx answers and the duplicates let through are printed (``-s``).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable

import aiohttp
import pytest
from redis import RedisCluster
from redis.cluster import ClusterNode

from bridge.dedup.redis_claims import RedisClaims
from bridge.dedup.redis_pipeline import connect
from bridge.dedup.store import ClaimState
from bridge.redis_url import parse_redis_url
from tests.conftest import BridgeProcess, Broker, Signer, unique_name
from tests.history import OpenAILikeSender, check, make_sender
from tests.redis_topologies import RedisClusterNodes, redis_cluster

__all__ = ["make_sender", "redis_cluster"]  # fixtures used by the tests below

pytestmark = [pytest.mark.redis]

PREFIX = "webhook-bridge:cluster-test:"


def keys_per_master(cluster: RedisClusterNodes, pattern: str) -> dict[int, int]:
    counts = {}
    for port in cluster.masters():
        seed = ClusterNode("127.0.0.1", port)  # type: ignore[no-untyped-call]
        with RedisCluster(startup_nodes=[seed]) as client:
            node = client.get_node("127.0.0.1", port)
            keys = client.scan_iter(match=pattern, count=1000, target_nodes=node)
            counts[port] = sum(1 for _ in keys)
    return counts


async def test_one_turns_claims_span_every_master_in_one_round(
    redis_cluster: RedisClusterNodes,
) -> None:
    claims = RedisClaims(
        connect(parse_redis_url(redis_cluster.url), timeout=2.0),
        prefix=PREFIX,
        window_seconds=3600,
    )
    try:
        await claims.start()
        keys = [f"wh_{n}" for n in range(2000)]
        first = await asyncio.gather(*(claims.claim(key, 10_000) for key in keys))
        assert {claim.state for claim in first} == {ClaimState.NEW}
        assert {
            c.state for c in await asyncio.gather(*(claims.claim(k, 10_000) for k in keys))
        } == {ClaimState.IN_FLIGHT}
        await asyncio.gather(*(claims.confirm(claim.key, claim.token) for claim in first))
        again = await asyncio.gather(*(claims.claim(key, 10_000) for key in keys))
        assert {claim.state for claim in again} == {ClaimState.CONFIRMED}
    finally:
        await claims.commands.close()
    remembered = keys_per_master(redis_cluster, f"{PREFIX}{{*}}:c:*")
    assert len(remembered) == 3
    assert all(count > 0 for count in remembered.values()), remembered
    assert keys_per_master(redis_cluster, f"{PREFIX}{{*}}:i:*") == dict.fromkeys(remembered, 0)


@pytest.mark.broker
async def test_two_bridges_across_a_cluster_losing_a_master_lose_nothing_acknowledged(
    start_bridge: Callable[..., BridgeProcess],
    broker: Broker,
    signer: Signer,
    redis_cluster: RedisClusterNodes,
    make_sender: Callable[..., OpenAILikeSender],
) -> None:
    exchange = unique_name("test.webhooks")
    settings = {
        "BRIDGE_DEDUP_URL": redis_cluster.url,
        "BRIDGE_DEDUP_KEY_PREFIX": PREFIX,
        "BRIDGE_DEDUP_ON_ERROR": "reject",
        "BRIDGE_DEDUP_TIMEOUT": "0.5",
        "BRIDGE_PUBLISH_TIMEOUT": "2",
    }
    pods = [start_bridge(exchange, **settings) for _ in range(2)]
    for pod in pods:
        await pod.wait_ready()
    queue = await broker.bind_queue(exchange, "#")
    senders = [make_sender(pod.url, signer, concurrency=4, retry_deadline=60) for pod in pods]
    for sender in senders:
        sender.start()
    for sender in senders:
        await sender.wait_accepted(100)

    victim = next(iter(redis_cluster.masters()))
    replica = redis_cluster.replica_of(victim)
    node = redis_cluster.node_on(victim)
    assert node.process is not None
    fault_at = time.monotonic()
    node.process.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while replica not in redis_cluster.masters():
        assert time.monotonic() < deadline, "the replica was not promoted"
        await asyncio.sleep(0.2)
    for sender in senders:
        await sender.accept_more(100)
    histories = [await sender.finish() for sender in senders]

    # Each id answered in the last two seconds before the fault, delivered again to the
    # other pod: published again only if its confirmation was lost with the master.
    again = [
        (webhook_id, history.bodies[webhook_id], senders[1 - n])
        for n, history in enumerate(histories)
        for webhook_id in history.accepted_answered_between(fault_at - 2, fault_at)
    ]
    async with aiohttp.ClientSession() as session:
        for webhook_id, body, other in again:
            await other.deliver(session, webhook_id, body)

    in_queue = [message.message_id or "" for message in await broker.drain(queue)]
    for n, history in enumerate(histories):
        check(f"cluster master sigkill, pod {n}", history, in_queue)
    duplicates = sum(count - 1 for count in Counter(in_queue).values())
    gaps = [history.longest_gap_after(fault_at) for history in histories]
    resumed = [history.first_2xx_sent_after(fault_at) for history in histories]
    print(
        f"\ncluster master sigkill: first 2xx to a request sent after the fault {max(resumed):.2f}"
        f" s after it, longest gap between 2xx answers {max(gaps):.2f} s, {duplicates} of "
        f"{len(again)} ids delivered again were published again ({len(set(in_queue))} ids, "
        f"{sum(history.statuses[503] for history in histories)} 503s)"
    )
