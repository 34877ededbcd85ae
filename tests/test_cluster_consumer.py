"""Node loss on a real three-node RabbitMQ cluster, seen by a consumer: every event the
bridge confirmed reaches it, exactly once with an idempotency store, and it never restarts.

Each scenario runs a bridge given all three nodes' URLs under a steady stream from a sender
that behaves like OpenAI, and one :class:`EventConsumer` given the same list, reading a
quorum queue bound ``#`` with an in-process idempotency store; the nodes holding the
bridge's connection, the consumer's and the queue's leader are chosen per scenario. After
the fault the sender goes on until 100 more events got a 2xx; then every ``webhook-id``
that got a 2xx must have been handed to the consumer exactly once, by the same consumer
object, whose iteration never ended. The time from the fault to the end of the longest
pause in what the consumer was handed is printed (``pytest -s``): the resume time the docs
state. The clusters are the ones tests/test_cluster.py uses (one per release per run).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from bridge.consumer import EventConsumer, InMemoryIdempotencyStore
from bridge.nodes import BrokerNodes, node_address, parse_node_urls
from tests.brokers import Node
from tests.cluster import Cluster, connected_node
from tests.conftest import BridgeProcess, Signer, unique_name
from tests.history import OpenAILikeSender, check
from tests.test_cluster import HEARTBEAT, PUBLISH_TIMEOUT

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.disruptive,
    pytest.mark.timeout(420),
]

# The consumer's own heartbeat: a frozen node is given up after (2 + 1) x 3 = 9 s.
CONSUMER_HEARTBEAT = 2
# How long the waits below allow for the consumer to catch up; never a claim on speed.
CATCH_UP_SECONDS = 180.0


@dataclass
class Handled:
    """The ``webhook-id`` of every event handed to the consumer, and when it was."""

    ids: Counter[str] = field(default_factory=Counter)
    times: list[float] = field(default_factory=list)

    def record(self, webhook_id: str | None) -> None:
        self.ids[webhook_id or ""] += 1
        self.times.append(time.monotonic())

    def resumed_after(self, fault_at: float) -> float:
        """Seconds from ``fault_at`` to the end of the longest pause in deliveries since."""
        after = [moment for moment in self.times if moment > fault_at]
        assert after, "nothing was handed to the consumer after the fault"
        _, resumed_at = max(
            (moment - before, moment)
            for before, moment in zip([fault_at, *after], after, strict=False)
        )
        return resumed_at - fault_at


@dataclass
class Scenario:
    bridge: BridgeProcess
    bridge_node: Node
    consumer: EventConsumer
    consumer_node: Node
    leader: Node
    sender: OpenAILikeSender
    handled: Handled
    consuming: asyncio.Task[None]


Layout = Callable[[Cluster, Node], tuple[Node, Node]]
"""Given the cluster and the bridge's node: the consumer's node and the queue's leader."""


def apart_from_the_bridge(cluster: Cluster, bridge_node: Node) -> tuple[Node, Node]:
    """The consumer on another node than the bridge, its queue led by the bridge's node."""
    return next(node for node in cluster.nodes if node is not bridge_node), bridge_node


def leader_apart(cluster: Cluster, bridge_node: Node) -> tuple[Node, Node]:
    """The consumer on the bridge's node, its queue led by another one."""
    return bridge_node, next(node for node in cluster.nodes if node is not bridge_node)


def all_on_one(_cluster: Cluster, bridge_node: Node) -> tuple[Node, Node]:
    return bridge_node, bridge_node


def rng_starting_with(cluster: Cluster, node: Node) -> random.Random:
    """A random generator whose shuffle of the cluster's URLs puts ``node`` first."""
    urls = parse_node_urls(cluster.urls)
    for seed in itertools.count():
        if node_address(BrokerNodes(urls, random.Random(seed)).round()[0]) == node.address:
            return random.Random(seed)
    raise AssertionError("unreachable")


async def consume_into(consumer: EventConsumer, handled: Handled) -> None:
    async for delivery in consumer:
        handled.record(delivery.message_id)
        await delivery.ack()


async def start_consuming(
    stack: contextlib.AsyncExitStack, cluster: Cluster, exchange: str, on: Node, leader: Node
) -> tuple[EventConsumer, Handled, asyncio.Task[None]]:
    """An :class:`EventConsumer` given every node's URL, connected to ``on`` and reading a
    new quorum queue led by ``leader`` with an in-process idempotency store, handing what
    it reads to a :class:`Handled`; the consumer and its loop end with ``stack``."""
    queue = unique_name("test.cluster.consumer")
    consumer_of = functools.partial(
        EventConsumer,
        exchange=exchange,
        patterns=["#"],
        queue=queue,
        quorum=True,
        dead_letter_exchange=f"{queue}.dead",
        heartbeat=CONSUMER_HEARTBEAT,
        timeout=5.0,
    )
    # Declared first through the leader's node: a quorum queue is led from where it was
    # declared.
    async with consumer_of(leader.url):
        pass
    consumer = consumer_of(
        cluster.urls, idempotency=InMemoryIdempotencyStore(), rng=rng_starting_with(cluster, on)
    )
    await stack.enter_async_context(consumer)
    assert consumer.node == on.address
    assert cluster.leader_of(queue) is leader
    handled = Handled()
    consuming = asyncio.create_task(consume_into(consumer, handled))
    stack.push_async_callback(_stopped, consuming)
    return consumer, handled, consuming


@pytest.fixture
async def start_scenario(
    cluster: Cluster,
    start_bridge: Callable[..., BridgeProcess],
    signer: Signer,
    make_sender: Callable[..., OpenAILikeSender],
) -> AsyncIterator[Callable[[Layout], Awaitable[Scenario]]]:
    """Scenarios whose consumers are always closed, even when a test fails halfway."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(layout: Layout) -> Scenario:
            bridge = start_bridge(
                BRIDGE_AMQP_URL=cluster.urls,
                BRIDGE_PUBLISH_TIMEOUT=str(PUBLISH_TIMEOUT),
                BRIDGE_AMQP_HEARTBEAT=str(HEARTBEAT),
            )
            await bridge.wait_ready(timeout=60)
            bridge_node = await connected_node(cluster, bridge)
            consumer_node, leader = layout(cluster, bridge_node)
            consumer, handled, consuming = await start_consuming(
                stack, cluster, bridge.exchange, consumer_node, leader
            )
            sender = make_sender(bridge.url, signer, retry_deadline=180.0)
            sender.start()
            await sender.wait_accepted(100)
            return Scenario(
                bridge, bridge_node, consumer, consumer_node, leader, sender, handled, consuming
            )

        yield start


async def _stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def finish_and_check(scenario: Scenario, name: str, *, fault_at: float) -> float:
    """Let 100 more events through, stop the sender and check with the history checker
    (every 2xx'd event handled, none twice); the time the consumer took to resume."""
    sender, handled, consumer = scenario.sender, scenario.handled, scenario.consumer
    await sender.accept_more(100, timeout=CATCH_UP_SECONDS)
    history = await sender.finish()
    async with asyncio.timeout(CATCH_UP_SECONDS):
        while not history.accepted <= handled.ids.keys() and not scenario.consuming.done():
            await asyncio.sleep(0.2)
    assert not scenario.consuming.done(), "the consumer's iteration ended"
    verdict = check(name, history, handled.ids.elements())
    assert verdict.duplicates == 0, f"events handed to the consumer twice: {verdict.summary}"
    resumed = handled.resumed_after(fault_at)
    print(  # the figures the docs state: pytest -s -m cluster shows them
        f"\n{scenario.consumer_node.release.version} {name}: consumer resumed "
        f"{resumed:.2f} s after the fault, {consumer.reconnects} reconnect(s), "
        f"{verdict.accepted} events, each handled once"
    )
    return resumed


async def test_the_consumer_leaves_its_killed_node_for_another(
    start_scenario: Callable[[Layout], Awaitable[Scenario]],
) -> None:
    scenario = await start_scenario(apart_from_the_bridge)

    fault_at = time.monotonic()
    scenario.consumer_node.kill()
    await finish_and_check(scenario, "consumer's node killed", fault_at=fault_at)
    assert scenario.consumer.reconnects == 1
    assert scenario.consumer.node not in (None, scenario.consumer_node.address)


async def test_the_consumer_goes_on_when_its_queue_leader_is_killed(
    start_scenario: Callable[[Layout], Awaitable[Scenario]],
) -> None:
    scenario = await start_scenario(leader_apart)

    fault_at = time.monotonic()
    scenario.leader.kill()
    await finish_and_check(scenario, "queue leader killed", fault_at=fault_at)
    assert scenario.consumer.node == scenario.consumer_node.address


async def test_the_consumer_waits_out_a_lost_majority(
    cluster: Cluster, start_scenario: Callable[[Layout], Awaitable[Scenario]]
) -> None:
    scenario = await start_scenario(all_on_one)
    others = [node for node in cluster.nodes if node is not scenario.consumer_node]

    fault_at = time.monotonic()
    for node in others:
        node.kill()
    await asyncio.sleep(PUBLISH_TIMEOUT * 3)
    await asyncio.to_thread(cluster.restart, others)
    await finish_and_check(scenario, "majority lost and back", fault_at=fault_at)
    assert scenario.consumer.node is not None


async def test_the_consumer_gives_up_a_frozen_node(
    start_scenario: Callable[[Layout], Awaitable[Scenario]],
) -> None:
    scenario = await start_scenario(apart_from_the_bridge)
    frozen = scenario.consumer_node

    fault_at = time.monotonic()
    frozen.pause()
    try:
        async with asyncio.timeout(CATCH_UP_SECONDS):
            while scenario.consumer.reconnects == 0:
                await asyncio.sleep(0.2)
    finally:
        # Woken before the other nodes declare it down (net_ticktime): no partition. What
        # it held for the consumer it returns once it sees the connection gone.
        frozen.resume()
    await finish_and_check(scenario, "consumer's node frozen", fault_at=fault_at)
    assert scenario.consumer.node not in (None, frozen.address)
