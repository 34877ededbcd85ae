"""Network partitions of a three-node RabbitMQ cluster: nothing that got a 2xx is lost.

Each node runs alone in a network namespace (tests/netns.py) with ``pause_minority`` and a
``net_ticktime`` of 8 s; each bridge runs in a namespace of its own, given all three nodes'
URLs, under an OpenAI-like sender at 25 events/s (from the root namespace, which reaches
every namespace through the test bridge). Links are cut with nftables rules inside the
namespaces, then healed, and every scenario ends with its history checked against a quorum
queue bound ``#`` (tests/history.py): no 2xx'd event missing, no status but 2xx and 503.
The consumer's scenario checks it against what an :class:`EventConsumer` handed its
handler instead; that consumer runs in the test's own process, in the root namespace like
the sender, which reaches every node through the test bridge and which no cut touches.
One cluster serves every scenario; each leaves it healed and whole for the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.brokers import RABBITMQ_BIN, Node, make_home
from tests.cluster import Cluster, ClusterQueue, connected_node
from tests.conftest import BridgeProcess, Signer, bridge_environment, unique_name
from tests.history import History, OpenAILikeSender, check
from tests.netns import Namespace, NamespacedNode, Network, cut, namespace_network, namespaced_node
from tests.test_cluster_consumer import (
    Scenario,
    apart_from_the_bridge,
    finish_and_check,
    start_consuming,
)

pytestmark = [pytest.mark.partition, pytest.mark.timeout(300)]

PUBLISH_TIMEOUT = 2.0
HEARTBEAT = 5
EVENTS_PER_SECOND = 25.0
CUT_SECONDS = 20.0
"""Long enough for the minority to notice (net_ticktime 8 s) and pause."""
FAILOVER_BOUND = 90.0
BRIDGE_PORT = 8080  # each bridge is alone in its namespace


def _missing_tools() -> str:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path(RABBITMQ_BIN / "rabbitmq-server").exists():
        return "RabbitMQ server is not installed"
    return ""


@dataclass
class Lab:
    network: Network
    cluster: Cluster
    clients: list[Namespace]

    def namespace_of(self, node: NamespacedNode) -> Namespace:
        assert node.namespace is not None
        return node.namespace

    def nodes_other_than(self, node: NamespacedNode) -> list[NamespacedNode]:
        return [other for other in self.nodes if other is not node]

    def node_and_peers(self, node: NamespacedNode) -> tuple[list[Namespace], list[Namespace]]:
        """The two sides of a cut between ``node`` and the rest of the cluster."""
        return [self.namespace_of(node)], [
            self.namespace_of(other) for other in self.nodes_other_than(node)
        ]

    @property
    def nodes(self) -> list[NamespacedNode]:
        return [node for node in self.cluster.nodes if isinstance(node, NamespacedNode)]


@pytest.fixture(scope="module")
def partition_lab() -> Iterator[Lab]:
    """Three clustered nodes and two bridge namespaces on a network of the tests' own."""
    if missing := _missing_tools():
        pytest.skip(missing)
    with namespace_network() as network, tempfile.TemporaryDirectory(prefix="partitions-") as tmp:
        directory = Path(tmp)
        home = make_home(directory / "home")
        nodes = [
            namespaced_node(network.add(f"n{number}", number), directory / f"n{number}", home)
            for number in (1, 2, 3)
        ]
        clients = [network.add(f"c{number}", 20 + number) for number in (1, 2)]
        members: list[Node] = list(nodes)
        cluster = Cluster(members)
        try:
            cluster.start()
            yield Lab(network, cluster, clients)
        finally:
            cluster.stop()


HEAL_BOUND = 60.0
"""How long a healed cluster may take to be whole again before a stuck node is restarted."""


def heal(lab: Lab, scenario: str) -> None:
    """Remove every cut and wait for the cluster to be whole again.

    A node paused by ``pause_minority`` restarts its broker by itself once it sees the
    majority again; seen here with RabbitMQ 3.10 on Erlang 25, a node paused for the
    second time can instead hang in that restart (in ``global:sync``), never coming back.
    An operator restarts such a node; so does this, and says so on the scenario's output.
    """
    lab.network.heal()
    try:
        lab.cluster.await_whole(timeout=HEAL_BOUND)
    except AssertionError:
        stuck: list[Node] = [node for node in lab.nodes if not broker_running(node)]
        for node in stuck:
            node.kill()
        lab.cluster.restart(stuck)
        lab.cluster.await_whole()
        print(f"{scenario}: restarted {[node.name for node in stuck]}, stuck after the heal")


def broker_running(node: Node) -> bool:
    try:
        return node.ctl("eval", "rabbit:is_running().", timeout=30).strip() == "true"
    except (AssertionError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def lab(partition_lab: Lab, scenario: str) -> Iterator[Lab]:
    """The module's lab, healed and whole again after each scenario, whatever it did."""
    yield partition_lab
    heal(partition_lab, scenario)


@pytest.fixture
def start_bridge_in(signer: Signer, tmp_path: Path) -> Iterator[Callable[..., BridgeProcess]]:
    """``webhook-bridge serve`` in a client namespace, given every node's URL."""
    started: list[BridgeProcess] = []

    def start(namespace: Namespace, cluster: Cluster, exchange: str) -> BridgeProcess:
        log_path = tmp_path / f"bridge-{len(started)}.log"
        environment = bridge_environment(
            signer,
            exchange,
            BRIDGE_PORT,
            BRIDGE_HOST=namespace.address,
            BRIDGE_AMQP_URL=cluster.urls,
            BRIDGE_PUBLISH_TIMEOUT=str(PUBLISH_TIMEOUT),
            BRIDGE_AMQP_HEARTBEAT=str(HEARTBEAT),
        )
        with log_path.open("w") as log:
            process = subprocess.Popen(
                namespace.command(sys.executable, "-m", "bridge", "serve"),
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        bridge = BridgeProcess(process, BRIDGE_PORT, exchange, log_path, host=namespace.address)
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.stop(signal.SIGKILL)


@dataclass
class Loaded:
    bridge: BridgeProcess
    sender: OpenAILikeSender
    node: NamespacedNode


@pytest.fixture
def start_loaded(
    lab: Lab,
    start_bridge_in: Callable[..., BridgeProcess],
    signer: Signer,
    make_sender: Callable[..., OpenAILikeSender],
) -> Callable[..., Awaitable[Loaded]]:
    """A ready bridge in ``client`` under load, and the node it is connected to; with
    ``sending=False``, its sender is left for the test to start."""

    async def start(client: Namespace, exchange: str, *, sending: bool = True) -> Loaded:
        bridge = start_bridge_in(client, lab.cluster, exchange)
        await bridge.wait_ready(timeout=60)
        node = await connected_node(lab.cluster, bridge)
        assert isinstance(node, NamespacedNode)
        sender = make_sender(
            bridge.url, signer, rate=EVENTS_PER_SECOND, retry_deadline=600.0, concurrency=8
        )
        if sending:
            sender.start()
        return Loaded(bridge, sender, node)

    return start


async def wait_until(condition: Callable[[], Awaitable[bool]], bound: float, what: str) -> float:
    """Poll ``condition`` until true; the seconds it took (fails after ``bound``)."""
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < bound, f"{what} within {bound:g} s"
        await asyncio.sleep(0.25)
    return time.monotonic() - started


async def moved_off(lab: Lab, bridge: BridgeProcess, node: NamespacedNode) -> bool:
    try:
        return await connected_node(lab.cluster, bridge) is not node
    except ValueError:  # connected to none right now
        return False


async def heal_and_check(
    lab: Lab, scenario: str, loaded: list[Loaded], queue: ClusterQueue
) -> list[History]:
    await asyncio.to_thread(heal, lab, scenario)
    for one in loaded:
        await one.sender.accept_more(50, timeout=FAILOVER_BOUND)
    histories = [await one.sender.finish() for one in loaded]
    arrived = await queue.ids()
    for number, (one, history) in enumerate(zip(loaded, histories, strict=True)):
        name = scenario if len(loaded) == 1 else f"{scenario} bridge {number + 1}"
        check(name, history, arrived)
        assert_recovered_without_restart(one.bridge)
    return histories


def assert_recovered_without_restart(bridge: BridgeProcess) -> None:
    assert bridge.process.poll() is None, "the bridge recovered without a restart"
    assert "Traceback" not in bridge.log_path.read_text()


async def fails_over_across_a_cut(
    lab: Lab,
    loaded: Loaded,
    exchange: str,
    scenario: str,
    cut_off: Callable[[NamespacedNode], tuple[list[Namespace], list[Namespace]]],
) -> None:
    """Under load, the two sides ``cut_off`` names for the bridge's node are cut apart: the
    bridge moves to another node, and once healed every accepted event arrived."""
    node = loaded.node
    queue = await ClusterQueue.declare(lab.cluster, exchange, lab.nodes_other_than(node)[0])
    await loaded.sender.wait_accepted(100)

    fault_at = time.monotonic()
    cut(*cut_off(node))
    moved = await wait_until(
        lambda: moved_off(lab, loaded.bridge, node), FAILOVER_BOUND, "the bridge left the node"
    )
    await loaded.sender.accept_more(50, timeout=FAILOVER_BOUND)
    print(f"\n{scenario}: on another node {moved:.1f} s after the cut")
    (history,) = await heal_and_check(lab, scenario, [loaded], queue)
    print(f"{scenario}: 2xx again {history.first_2xx_sent_after(fault_at):.1f} s after the cut")


async def test_the_bridges_node_cut_off_from_its_peers(
    lab: Lab, start_loaded: Callable[..., Awaitable[Loaded]], scenario: str
) -> None:
    exchange = unique_name("test.partition")
    loaded = await start_loaded(lab.clients[0], exchange)
    await fails_over_across_a_cut(lab, loaded, exchange, scenario, lab.node_and_peers)


async def test_the_bridge_cut_off_from_its_node(
    lab: Lab, start_loaded: Callable[..., Awaitable[Loaded]], scenario: str
) -> None:
    exchange = unique_name("test.partition")
    client = lab.clients[0]
    loaded = await start_loaded(client, exchange)
    await fails_over_across_a_cut(
        lab, loaded, exchange, scenario, lambda node: ([client], [lab.namespace_of(node)])
    )


async def test_two_bridges_on_opposite_sides_of_a_split(
    lab: Lab, start_loaded: Callable[..., Awaitable[Loaded]], scenario: str
) -> None:
    exchange = unique_name("test.partition")
    minority_client, majority_client = lab.clients
    first = await start_loaded(minority_client, exchange)
    second = await start_loaded(majority_client, exchange)
    minority = first.node
    majority = lab.nodes_other_than(minority)
    queue = await ClusterQueue.declare(lab.cluster, exchange, majority[0])
    for loaded in (first, second):
        await loaded.sender.wait_accepted(100)

    fault_at = time.monotonic()
    cut(
        [lab.namespace_of(minority), minority_client],
        [*(lab.namespace_of(node) for node in majority), majority_client],
    )
    await asyncio.sleep(CUT_SECONDS)
    await second.sender.accept_more(50, timeout=FAILOVER_BOUND)
    healed_at = time.monotonic()
    on_the_minority = [
        attempt
        for attempt in first.sender.history.accepted_sent_after(fault_at + PUBLISH_TIMEOUT)
        if attempt.answered < healed_at
    ]
    assert on_the_minority == [], "the minority side cannot confirm, so gives no 2xx"
    await heal_and_check(lab, scenario, [first, second], queue)


async def test_the_quorum_queue_leader_isolated(
    lab: Lab, start_loaded: Callable[..., Awaitable[Loaded]], scenario: str
) -> None:
    exchange = unique_name("test.partition")
    loaded = await start_loaded(lab.clients[0], exchange)
    queue = await ClusterQueue.declare(lab.cluster, exchange, lab.nodes_other_than(loaded.node)[0])
    leader = lab.cluster.leader_of(queue.name)
    assert isinstance(leader, NamespacedNode)
    assert leader is not loaded.node, "the queue is led from another node than the bridge's"
    await loaded.sender.wait_accepted(100)

    fault_at = time.monotonic()
    isolated = lab.namespace_of(leader)
    cut(
        [isolated], [namespace for namespace in lab.network.namespaces if namespace is not isolated]
    )
    await asyncio.sleep(CUT_SECONDS)
    await loaded.sender.accept_more(50, timeout=FAILOVER_BOUND)
    assert await connected_node(lab.cluster, loaded.bridge) is loaded.node, "no failover needed"
    (history,) = await heal_and_check(lab, scenario, [loaded], queue)
    print(f"{scenario}: 2xx again {history.first_2xx_sent_after(fault_at):.1f} s after the cut")


FLAP_CUT_SECONDS = 10.0
FLAP_HEALED_SECONDS = 5.0
FLAP_FOR_SECONDS = 60.0


async def test_a_flapping_partition(
    lab: Lab, start_loaded: Callable[..., Awaitable[Loaded]], scenario: str
) -> None:
    exchange = unique_name("test.partition")
    loaded = await start_loaded(lab.clients[0], exchange)
    node = loaded.node
    queue = await ClusterQueue.declare(lab.cluster, exchange, lab.nodes_other_than(node)[0])
    await loaded.sender.wait_accepted(100)

    started = time.monotonic()
    flaps = 0
    while time.monotonic() - started < FLAP_FOR_SECONDS:
        cut(*lab.node_and_peers(node))
        await asyncio.sleep(FLAP_CUT_SECONDS)
        lab.network.heal()  # only the links: the nodes are left to sort themselves out
        await asyncio.sleep(FLAP_HEALED_SECONDS)
        flaps += 1
    print(f"\n{scenario}: {flaps} cuts of {FLAP_CUT_SECONDS:g} s")
    await heal_and_check(lab, scenario, [loaded], queue)


async def test_the_consumers_node_cut_off_from_its_peers(
    lab: Lab, start_loaded: Callable[..., Awaitable[Loaded]], scenario: str
) -> None:
    exchange = unique_name("test.partition")
    loaded = await start_loaded(lab.clients[0], exchange, sending=False)
    # The consumer alone on the node that is cut off, its queue led from the majority's side.
    consumer_node, leader = apart_from_the_bridge(lab.cluster, loaded.node)
    assert isinstance(consumer_node, NamespacedNode)
    async with contextlib.AsyncExitStack() as stack:
        consumer, handled, consuming = await start_consuming(
            stack, lab.cluster, exchange, consumer_node, leader
        )
        loaded.sender.start()
        await loaded.sender.wait_accepted(100)

        fault_at = time.monotonic()
        cut(
            [lab.namespace_of(consumer_node)],
            [lab.namespace_of(other) for other in lab.nodes_other_than(consumer_node)],
        )

        async def moved() -> bool:
            return consumer.node not in (None, consumer_node.address)

        moved_after = await wait_until(moved, FAILOVER_BOUND, "the consumer left the node")
        print(f"\n{scenario}: consumer on another node {moved_after:.1f} s after the cut")
        await asyncio.to_thread(heal, lab, scenario)
        consumed = Scenario(
            bridge=loaded.bridge,
            bridge_node=loaded.node,
            consumer=consumer,
            consumer_node=consumer_node,
            leader=leader,
            sender=loaded.sender,
            handled=handled,
            consuming=consuming,
        )
        await finish_and_check(consumed, scenario, fault_at=fault_at)
    assert consumer.reconnects == 1
    assert_recovered_without_restart(loaded.bridge)
