"""Node loss on a real three-node RabbitMQ cluster: nothing that got a 2xx is lost.

Every scenario runs a bridge given all three nodes' URLs under load from a sender that
behaves like OpenAI (retries every non-2xx and connection error), does something to one or
more nodes, and then checks against a quorum queue bound ``#``: every ``webhook-id`` that
got a 2xx is in the queue, the only error status seen was 503, the bridge process was never
restarted, and a request sent after the fault got a 2xx within a bound. Each scenario
leaves all three nodes running for the next one.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest

from tests.brokers import Node
from tests.cluster import Cluster, ClusterQueue, connected_node
from tests.conftest import BridgeProcess, Signer
from tests.history import OpenAILikeSender, check

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.disruptive,
    pytest.mark.timeout(360),
]

PUBLISH_TIMEOUT = 2.0
HEARTBEAT = 10
# A killed node resets its connections: the bridge is on another node at once.
KILLED_NODE_RECOVERY_BOUND = 10.0
# A frozen node answers nothing: aiormq gives it up after (heartbeat + 1) x 3 seconds.
FROZEN_NODE_RECOVERY_BOUND = (HEARTBEAT + 1) * 3 + 15.0


@dataclass
class Loaded:
    bridge: BridgeProcess
    sender: OpenAILikeSender
    queue: ClusterQueue


@pytest.fixture
def start_loaded(
    cluster: Cluster,
    start_bridge: Callable[..., BridgeProcess],
    signer: Signer,
    make_sender: Callable[..., OpenAILikeSender],
) -> Callable[..., Awaitable[tuple[Loaded, Node]]]:
    """A bridge given every node's URL, under load, and the node it is connected to.

    The test queue is declared (and so led) on that node, or with ``queue_elsewhere`` on
    another one; ``queue`` reuses one declared before.
    """

    async def start(
        *, queue_elsewhere: bool, exchange: str | None = None, queue: ClusterQueue | None = None
    ) -> tuple[Loaded, Node]:
        bridge = start_bridge(
            exchange,
            BRIDGE_AMQP_URL=cluster.urls,
            BRIDGE_PUBLISH_TIMEOUT=str(PUBLISH_TIMEOUT),
            BRIDGE_AMQP_HEARTBEAT=str(HEARTBEAT),
        )
        await bridge.wait_ready(timeout=60)
        node = await connected_node(cluster, bridge)
        if queue is None:
            queue_on = (
                next(other for other in cluster.nodes if other is not node)
                if queue_elsewhere
                else node
            )
            queue = await ClusterQueue.declare(cluster, bridge.exchange, queue_on)
        sender = make_sender(bridge.url, signer, retry_deadline=180.0)
        sender.start()
        await sender.wait_accepted(100)
        return Loaded(bridge, sender, queue), node

    return start


async def reconnects(bridge: BridgeProcess) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{bridge.port}/metrics") as response,
    ):
        text = await response.text()
    (value,) = re.findall(r"^webhook_bridge_broker_reconnects_total (\S+)$", text, re.MULTILINE)
    return float(value)


async def finish_and_check(
    loaded: Loaded, scenario: str, *, fault_at: float, bound: float
) -> float:
    """Let 2xx resume, stop the sender and check its history; the recovery time."""
    sender = loaded.sender
    await sender.accept_more(100, timeout=bound + 60)
    history = await sender.finish()
    recovery = history.first_2xx_sent_after(fault_at)
    check(scenario, history, await loaded.queue.ids())
    assert loaded.bridge.process.poll() is None, "the bridge recovered without a restart"
    assert loaded.bridge.log_path.read_text().count('"listening on') == 1
    assert recovery < bound, f"2xx resumed only {recovery:.1f} s after the fault"
    print(f"{scenario}: 2xx resumed {recovery:.2f} s after the fault")  # pytest -s shows it
    return recovery


async def test_killing_the_connected_node_fails_over(
    cluster: Cluster,
    start_loaded: Callable[..., Awaitable[tuple[Loaded, Node]]],
    scenario: str,
) -> None:
    loaded, node = await start_loaded(queue_elsewhere=True)

    fault_at = time.monotonic()
    node.kill()
    await finish_and_check(loaded, scenario, fault_at=fault_at, bound=KILLED_NODE_RECOVERY_BOUND)
    new_node = await connected_node(cluster, loaded.bridge)
    assert new_node is not node
    assert await reconnects(loaded.bridge) >= 1


async def test_killing_the_quorum_queue_leader_elsewhere(
    cluster: Cluster,
    start_loaded: Callable[..., Awaitable[tuple[Loaded, Node]]],
    scenario: str,
) -> None:
    loaded, node = await start_loaded(queue_elsewhere=True)
    leader = cluster.leader_of(loaded.queue.name)
    assert leader is not node, "the queue is led from another node than the bridge's"

    fault_at = time.monotonic()
    leader.kill()
    await finish_and_check(loaded, scenario, fault_at=fault_at, bound=KILLED_NODE_RECOVERY_BOUND)
    assert await connected_node(cluster, loaded.bridge) is node, "no failover was needed"


async def test_losing_the_majority_only_503s_and_recovers(
    cluster: Cluster,
    start_loaded: Callable[..., Awaitable[tuple[Loaded, Node]]],
    scenario: str,
) -> None:
    loaded, node = await start_loaded(queue_elsewhere=False)
    killed = [other for other in cluster.nodes if other is not node]

    fault_at = time.monotonic()
    for other in killed:
        other.kill()
    await asyncio.sleep(PUBLISH_TIMEOUT * 3)
    accepted_during = loaded.sender.history.accepted_sent_after(fault_at + PUBLISH_TIMEOUT)
    assert accepted_during == [], "no majority, so no confirm and no 2xx"
    await asyncio.to_thread(cluster.restart, killed)
    restarted_at = time.monotonic()
    recovery = await finish_and_check(loaded, scenario, fault_at=fault_at, bound=180.0)
    print(f"both nodes running again {restarted_at - fault_at:.1f} s after the fault")
    assert recovery > PUBLISH_TIMEOUT * 3, "2xx only came back with the majority"


async def test_a_frozen_node_is_given_up(
    cluster: Cluster,
    start_loaded: Callable[..., Awaitable[tuple[Loaded, Node]]],
    scenario: str,
) -> None:
    loaded, node = await start_loaded(queue_elsewhere=True)

    fault_at = time.monotonic()
    node.pause()
    try:
        async with asyncio.timeout(FROZEN_NODE_RECOVERY_BOUND):
            while await connected_node(cluster, loaded.bridge) is node:
                await asyncio.sleep(0.5)
    finally:
        # Woken before the other nodes declare it down (net_ticktime), so no partition.
        node.resume()
    await finish_and_check(loaded, scenario, fault_at=fault_at, bound=FROZEN_NODE_RECOVERY_BOUND)
    assert await connected_node(cluster, loaded.bridge) is not node


async def test_two_bridges_both_recover_from_a_node_loss(
    cluster: Cluster,
    start_loaded: Callable[..., Awaitable[tuple[Loaded, Node]]],
    scenario: str,
) -> None:
    first, node = await start_loaded(queue_elsewhere=True)
    second, _ = await start_loaded(
        queue_elsewhere=True, exchange=first.bridge.exchange, queue=first.queue
    )

    fault_at = time.monotonic()
    node.kill()
    for loaded in (first, second):
        sender = loaded.sender
        await sender.accept_more(100, timeout=60)
    histories = [await loaded.sender.finish() for loaded in (first, second)]
    in_queue = await first.queue.ids()
    for number, (loaded, history) in enumerate(zip((first, second), histories, strict=True)):
        check(f"{scenario} bridge {number + 1}", history, in_queue)
        assert loaded.bridge.process.poll() is None
        recovery = history.first_2xx_sent_after(fault_at)
        assert recovery < KILLED_NODE_RECOVERY_BOUND
        print(f"{scenario} bridge {number + 1}: 2xx resumed {recovery:.2f} s after the fault")
