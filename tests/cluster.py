"""A three-node RabbitMQ cluster of the tests' own, on loopback ports of its own, of either
release the suite runs against (tests/brokers.py).

Each node has its own node name, ports, data and log directories, an empty plugins file
(so no management or metrics listener collides with anything) and an Erlang cookie that
only this cluster knows: the machine's own broker on 5672, its node and its data are never
touched. Nodes are killed, paused and restarted by the process id in their own pid file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiohttp
import pytest

from tests.brokers import (
    MACHINE,
    RABBITMQ_BIN,
    RELEASE_IDS,
    START_TIMEOUT,
    Node,
    Release,
    make_home,
    own_epmd,
    release_named,
    reserved_ports,
)
from tests.conftest import BridgeProcess, free_port, unique_name

CLUSTER_SIZE = 3


@dataclass
class Cluster:
    nodes: list[Node]

    @property
    def urls(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def node_at(self, address: str) -> Node:
        (node,) = (node for node in self.nodes if node.address == address)
        return node

    def any_running(self) -> Node:
        return next(node for node in self.nodes if node.running and not node.paused)

    def start(self) -> None:
        for node in self.nodes:
            node.write_config()
            node.start()
        self._in_parallel(Node.wait_started, self.nodes)
        first, *others = self.nodes
        if first.release.khepri:
            # On Mnesia, 4.0.5 checks at boot whether a denied deprecated feature is in use
            # before a joining or restarted node has its queue tables, fails to tell and stops
            # (failed_to_deny_deprecated_features). Khepri answers from the node's own copy,
            # and is what 4.2 gives new clusters and 4.3 keeps as the only store.
            first.ctl("enable_feature_flag", "--experimental", "khepri_db", timeout=120)
        for node in others:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        self.await_all_online()

    def await_all_online(self) -> None:
        self.any_running().ctl(
            "await_online_nodes",
            str(len(self.nodes)),
            "--timeout",
            str(START_TIMEOUT),
            timeout=START_TIMEOUT + 10,
        )

    def await_whole(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every node runs the broker, sees every other one and records no
        partition: after a partition heals, a paused minority restarts by itself."""
        deadline = time.monotonic() + timeout
        problem = ""
        while time.monotonic() < deadline:
            try:
                problem = next(
                    (problem for node in self.nodes if (problem := self._unwhole(node))), ""
                )
            except (AssertionError, subprocess.TimeoutExpired) as error:
                problem = str(error)
            if not problem:
                return
            time.sleep(1)
        raise AssertionError(f"the cluster is not whole again after {timeout:g} s: {problem}")

    def _unwhole(self, node: Node) -> str:
        status = json.loads(node.ctl("cluster_status", "--formatter", "json", timeout=30))
        running = set(status.get("running_nodes", []))
        if running != {other.name for other in self.nodes}:
            return f"{node.name} sees {sorted(running)} running"
        if status.get("partitions"):
            return f"{node.name} records partitions {status['partitions']}"
        return ""

    def restore(self) -> None:
        """Every node running and in the cluster again, whatever a test did to them."""
        for node in self.nodes:
            if node.paused:
                node.resume()
        stopped = [node for node in self.nodes if not node.running]
        for node in stopped:
            node.start()
        self._in_parallel(Node.wait_started, stopped)
        self.await_all_online()

    def restart(self, nodes: list[Node]) -> None:
        for node in nodes:
            node.start()
        self._in_parallel(Node.wait_started, nodes)

    def leader_of(self, queue: str) -> Node:
        """The node that leads quorum queue ``queue``."""
        for line in (
            self.any_running()
            .ctl("list_queues", "name", "leader", "--no-table-headers", "-q")
            .splitlines()
        ):
            name, _, leader = line.strip().partition("\t")
            if name == queue:
                (node,) = (node for node in self.nodes if node.name == leader.strip())
                return node
        raise AssertionError(f"queue {queue} has no leader")

    def stop(self) -> None:
        for node in self.nodes:
            if node.running:
                with contextlib.suppress(ProcessLookupError, FileNotFoundError, ValueError):
                    if node.paused:
                        node.resume()
                    node.kill()

    @staticmethod
    def _in_parallel(action: Callable[[Node], None], nodes: list[Node]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
            list(pool.map(action, nodes))  # re-raises the first failure


@contextlib.contextmanager
def running_cluster(release: Release) -> Iterator[Cluster]:
    """Start a fresh cluster of ``release``; kill its nodes and remove their data on exit.

    The machine's release registers its nodes with the machine's epmd; a release in a root
    of its own brings an epmd on ports of its own."""
    with contextlib.ExitStack() as stack:
        own_ports = None
        if release.root is not None:
            own_ports = stack.enter_context(reserved_ports())
            stack.enter_context(own_epmd(release, own_ports))
        directory = stack.enter_context(release.scratch_directory("rabbitmq-cluster"))
        home = make_home(directory / "home")
        prefix = f"webhook-bridge-test-{uuid.uuid4().hex[:6]}"
        cluster = Cluster(
            [
                Node(
                    f"{prefix}-{n}@localhost",
                    release,
                    free_port(),
                    free_port(),
                    directory / f"n{n}",
                    home,
                    own_ports,
                )
                for n in range(1, CLUSTER_SIZE + 1)
            ]
        )
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="session", params=RELEASE_IDS)
def rabbitmq_cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Three nodes of one release joined into one cluster, for every scenario on it (the
    bridge's and the consumers', whichever files they are in)."""
    release = release_named(request.param)
    if release is MACHINE and not Path(RABBITMQ_BIN / "rabbitmq-server").exists():
        pytest.skip("RabbitMQ server is not installed")
    with running_cluster(release) as cluster:
        yield cluster


@pytest.fixture
def cluster(rabbitmq_cluster: Cluster) -> Iterator[Cluster]:
    """The session's cluster, with every node running again after the test."""
    yield rabbitmq_cluster
    rabbitmq_cluster.restore()


@dataclass
class ClusterQueue:
    """A quorum queue bound ``#`` to the bridge's exchange, read through any running node."""

    cluster: Cluster
    name: str
    exchange: str

    @classmethod
    async def declare(cls, cluster: Cluster, exchange: str, on: Node) -> ClusterQueue:
        queue = cls(cluster, unique_name("test.cluster.queue"), exchange)
        async with await aio_pika.connect(on.url, timeout=10) as connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(
                queue.name, durable=True, arguments={"x-queue-type": "quorum"}
            )
            await declared.bind(exchange, routing_key="#")
        return queue

    async def ids(self) -> list[str]:
        """Every message id in this queue and in the bridge's unrouted queue, consumed."""
        ids: list[str] = []
        deadline = time.monotonic() + 60
        while True:
            node = self.cluster.any_running()
            try:
                async with await aio_pika.connect(node.url, timeout=10) as connection:
                    channel = await connection.channel()
                    for name in (self.name, f"{self.exchange}.unrouted"):
                        queue = await channel.get_queue(name, ensure=False)
                        while (message := await queue.get(no_ack=True, fail=False)) is not None:
                            ids.append(message.message_id or "")
                return ids
            except (aio_pika.exceptions.AMQPError, OSError):
                # A quorum queue is readable again once its members have elected a leader.
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)


async def connected_node(cluster: Cluster, bridge: BridgeProcess) -> Node:
    """The node the bridge says it is connected to, from its metrics."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{bridge.host}:{bridge.port}/metrics") as response,
    ):
        text = await response.text()
    (address,) = re.findall(r'webhook_bridge_broker_node_info\{node="([^"]+)"\} 1\.0', text)
    return cluster.node_at(address)
