"""Redis with Sentinel and Redis Cluster, started by the tests on loopback ports of their own."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from redis import Redis
from redis.exceptions import RedisError

from tests.redis_support import PrivateRedis, redis_port

SERVICE = "bridge-dedup"


@dataclass
class SentinelSet:
    """One master, one replica, three Sentinels watching them (quorum 2)."""

    master: PrivateRedis
    replica: PrivateRedis
    sentinels: list[PrivateRedis]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def master_port(self, timeout: float = 20.0) -> int:
        """The port of the master the Sentinels name now, once that server says it is one
        (on a loaded machine the Sentinels may be switching masters on their own)."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, RedisError):
                with Redis(port=self.sentinels[0].port, socket_timeout=2) as sentinel:
                    _host, port = sentinel.sentinel_get_master_addr_by_name(SERVICE)
                with Redis(port=int(port), socket_timeout=2) as server:
                    if server.execute_command("ROLE")[0] in (b"master", "master"):
                        return int(port)
            assert time.monotonic() < deadline, "the Sentinels name no answering master"
            time.sleep(0.1)

    def wait_for_master_other_than(self, port: int, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, TypeError, RedisError):
                with Redis(port=self.sentinels[0].port, socket_timeout=2) as sentinel:
                    _host, now = sentinel.sentinel_get_master_addr_by_name(SERVICE)
                if int(now) != port:
                    return int(now)
            time.sleep(0.1)
        raise AssertionError(f"the Sentinels did not replace the master on {port}")

    def server_on(self, port: int) -> PrivateRedis:
        return self.master if self.master.port == port else self.replica

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: the master hands over to its replica without losing it."""
        with Redis(port=self.sentinels[0].port, socket_timeout=5) as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)

    def wait_replicated(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with Redis(port=self.master.port, socket_timeout=2) as master:
            # Online, not only connected: a replica waits for its first full copy a few
            # seconds (repl-diskless-sync-delay), and promoted then it would hold nothing.
            while master.info("replication").get("slave0", {}).get("state") != "online":
                assert time.monotonic() < deadline, "the replica did not catch up"
                time.sleep(0.1)
        for sentinel in self.sentinels:
            with Redis(port=sentinel.port, socket_timeout=2) as client:
                while int(client.sentinel_master(SERVICE)["num-other-sentinels"]) < 2 or not int(
                    client.sentinel_master(SERVICE)["num-slaves"]
                ):
                    assert time.monotonic() < deadline, "the Sentinels did not find each other"
                    time.sleep(0.1)

    def stop(self) -> None:
        for server in [*self.sentinels, self.replica, self.master]:
            server.stop()


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    master = PrivateRedis(redis_port(), tmp_path / "master")
    replica_port = redis_port()
    replica = PrivateRedis(
        replica_port,
        tmp_path / "replica",
        options=("--replicaof", "127.0.0.1", str(master.port)),
    )
    sentinels = []
    for n in range(3):
        port = redis_port()
        lines = (
            f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} 2",
            f"sentinel down-after-milliseconds {SERVICE} 1000",
            f"sentinel failover-timeout {SERVICE} 5000",
        )
        sentinels.append(PrivateRedis(port, tmp_path / f"sentinel-{n}", sentinel_lines=lines))
    topology = SentinelSet(master, replica, sentinels)
    try:
        for server in [master, replica, *sentinels]:
            server.directory.mkdir(parents=True, exist_ok=True)
            server.start()
        topology.wait_replicated()
        yield topology
    finally:
        topology.stop()


@dataclass
class RedisClusterNodes:
    """Three masters, each with one replica, in one Redis Cluster."""

    nodes: list[PrivateRedis] = field(default_factory=list)

    @property
    def url(self) -> str:
        seeds = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[:3])
        return f"redis+cluster://{seeds}"

    def slots(self) -> list[tuple[int, int, int, list[int]]]:
        """Each slot range: its first and last slot, its master's port, its replicas' ports."""
        for node in self.nodes:
            try:
                with Redis(port=node.port, socket_timeout=2) as client:
                    reply = client.execute_command("CLUSTER", "SLOTS")
            except RedisError:
                continue  # stopped
            return [
                (int(start), int(end), int(master[1]), [int(r[1]) for r in replicas])
                for start, end, master, *replicas in reply
            ]
        raise AssertionError("no node is running")

    def masters(self) -> dict[int, list[tuple[int, int]]]:
        """Each master's port and the slot ranges it serves now."""
        ranges: dict[int, list[tuple[int, int]]] = {}
        for start, end, master, _replicas in self.slots():
            ranges.setdefault(master, []).append((start, end))
        return ranges

    def node_on(self, port: int) -> PrivateRedis:
        return next(node for node in self.nodes if node.port == port)

    def replica_of(self, port: int) -> int:
        for _start, _end, master, replicas in self.slots():
            if master == port and replicas:
                return replicas[0]
        raise AssertionError(f"the master on {port} has no replica")

    def wait_healthy(self, masters: int = 3, timeout: float = 30.0) -> None:
        """Until every node says the cluster is ok and each master has its replica."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError):
                live = [node for node in self.nodes if node.process is not None]
                states = []
                for node in live:
                    with Redis(port=node.port, socket_timeout=1) as client:
                        states.append(client.cluster("info")["cluster_state"])
                slots = self.slots()
                if (
                    set(states) == {"ok"}
                    and len({master for _s, _e, master, _r in slots}) == masters
                    and all(replicas for _s, _e, _m, replicas in slots)
                ):
                    return
            assert time.monotonic() < deadline, "the cluster did not become healthy"
            time.sleep(0.2)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterNodes]:
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.skip("redis-cli is not installed")
    cluster = RedisClusterNodes()
    try:
        for n in range(6):
            port = redis_port(cluster_bus=True)
            directory = tmp_path / f"node-{n}"
            directory.mkdir()
            options = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(directory / "nodes.conf"),
                "--cluster-node-timeout", "1000",
            )  # fmt: skip
            node = PrivateRedis(port, directory, options=options)
            node.start()
            cluster.nodes.append(node)
        addresses = [f"127.0.0.1:{node.port}" for node in cluster.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop()
