"""A test network of network namespaces, and RabbitMQ nodes that live in them.

Each namespace gets one veth pair whose outer end is enslaved to a Linux bridge of this run's
own (``wbt`` and six hex digits), and an address on a /24 of ``10.231.x.0`` that no
interface of the machine uses yet (chosen under a lock, so that two runs side by side take
two subnets). The root namespace gets the bridge's ``.254``, through which the test reaches
every namespace. Links are cut by nftables rules inside the namespaces only (a table of
their own, flushed to heal): nothing outside the namespaces, the bridge device and loopback
is ever touched.

Everything is undone on exit, whatever happened: the processes still running in the
namespaces (nodes, epmd, bridges) are killed by their process ids, then the namespaces
(with their veth ends), the outer veth ends and the bridge device are deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import signal
import subprocess
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.brokers import MACHINE, RABBITMQ_BIN, Node, RabbitMQ, environment_with
from tests.image import CACHE_DIR

SUBNETS = ipaddress.IPv4Network("10.231.0.0/16")
ROOT_HOST = 254
NET_TICKTIME = 8
"""Seconds: a peer that sends nothing for this long (give or take a quarter) is down."""
TABLE = "partition"


def ip(*args: str) -> str:
    return subprocess.run(
        ["ip", *args], check=True, capture_output=True, text=True, timeout=30
    ).stdout


@dataclass
class Namespace:
    """A network namespace of the test network, with one address on it."""

    name: str
    address: str

    def command(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def run(self, *command: str, stdin: str | None = None) -> None:
        subprocess.run(
            self.command(*command), check=True, capture_output=True, text=True, input=stdin,
            timeout=30,
        )  # fmt: skip

    def drop_traffic_with(self, others: Iterable[Namespace]) -> None:
        """Drop every packet to and from ``others``, in this namespace only."""
        addresses = ", ".join(other.address for other in others)
        self.run(
            "nft", "-f", "-",
            stdin=f"add rule inet {TABLE} input ip saddr {{ {addresses} }} drop\n"
            f"add rule inet {TABLE} output ip daddr {{ {addresses} }} drop\n",
        )  # fmt: skip

    def heal(self) -> None:
        self.run("nft", "flush", "table", "inet", TABLE)

    def pids(self) -> list[int]:
        return [int(pid) for pid in ip("netns", "pids", self.name).split()]


def cut(side: Iterable[Namespace], other_side: Iterable[Namespace]) -> None:
    """A partition: nothing flows between the two sides, in either direction."""
    side, other_side = list(side), list(other_side)
    for namespace in side:
        namespace.drop_traffic_with(other_side)
    for namespace in other_side:
        namespace.drop_traffic_with(side)


@dataclass
class Network:
    """Namespaces on one bridge; ``heal`` removes every cut made so far."""

    tag: str
    subnet: ipaddress.IPv4Network
    namespaces: list[Namespace] = field(default_factory=list)
    outer_links: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"wbt{self.tag}"

    def host(self, number: int) -> str:
        return str(self.subnet[number])

    def add(self, role: str, number: int) -> Namespace:
        """A new namespace named for ``role``, at host ``number`` of the subnet."""
        namespace = Namespace(f"wbt-{self.tag}-{role}", self.host(number))
        outer, inner = f"wbt{self.tag}{number}", "eth0"
        ip("netns", "add", namespace.name)
        self.namespaces.append(namespace)
        ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", namespace.name)
        self.outer_links.append(outer)
        ip("link", "set", outer, "master", self.bridge, "up")
        for args in (
            ("addr", "add", f"{namespace.address}/{self.subnet.prefixlen}", "dev", inner),
            ("link", "set", inner, "up"),
            ("link", "set", "lo", "up"),
        ):
            namespace.run("ip", *args)
        namespace.run(
            "nft", "-f", "-",
            stdin=f"add table inet {TABLE}\n"
            f"add chain inet {TABLE} input {{ type filter hook input priority 0; }}\n"
            f"add chain inet {TABLE} output {{ type filter hook output priority 0; }}\n",
        )  # fmt: skip
        return namespace

    def heal(self) -> None:
        for namespace in self.namespaces:
            namespace.heal()

    def remove(self) -> None:
        for namespace in self.namespaces:
            with contextlib.suppress(subprocess.CalledProcessError):
                for pid in namespace.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
                        os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.CalledProcessError):
                ip("netns", "delete", namespace.name)
        for outer in self.outer_links:
            # Gone with its namespace, unless a process still held that a moment longer.
            with contextlib.suppress(subprocess.CalledProcessError):
                ip("link", "delete", outer)
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("link", "delete", self.bridge)


def _unused_subnet() -> ipaddress.IPv4Network:
    used = ip("-4", "-o", "addr", "show")
    for subnet in SUBNETS.subnets(new_prefix=24):
        first_three = str(subnet.network_address).rpartition(".")[0]
        if f"inet {first_three}." not in used:
            return subnet
    raise AssertionError(f"every /24 of {SUBNETS} is in use on this machine")


@contextlib.contextmanager
def namespace_network() -> Iterator[Network]:
    """A bridge with the root namespace's address on it; removed with all it holds on exit."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    network = None
    try:
        with (CACHE_DIR / "test-network.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            network = Network(uuid.uuid4().hex[:6], _unused_subnet())
            ip("link", "add", network.bridge, "type", "bridge")
            ip(
                "addr", "add", f"{network.host(ROOT_HOST)}/{network.subnet.prefixlen}",
                "dev", network.bridge,
            )  # fmt: skip
            ip("link", "set", network.bridge, "up")
        yield network
    finally:
        if network is not None:
            network.remove()


@dataclass
class NamespacedNode(Node):
    """A node of the machine's release alone in ``namespace``, on the namespace's address,
    with its own epmd there, and a ``net_ticktime`` short enough for tests."""

    namespace: Namespace | None = None

    @property
    def host(self) -> str:
        assert self.namespace is not None
        return self.namespace.address

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{self.host}:{self.amqp_port}/"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.amqp_port}"

    @property
    def broker(self) -> RabbitMQ:
        assert self.namespace is not None
        return RabbitMQ(
            self.release,
            self.url,
            tuple(self.namespace.command(str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name)),
            self.variables(),
        )

    def variables(self) -> dict[str, str]:
        return {**super().variables(), "RABBITMQ_USE_LONGNAME": "true"}

    def write_config(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "rabbitmq-env.conf").write_text(
            # Not the machine's env file, which pins epmd and distribution to 127.0.0.1.
            f"NODENAME={self.name}\n"
            "USE_LONGNAME=true\n"
            f"NODE_PORT={self.amqp_port}\n"
            f"DIST_PORT={self.dist_port}\n"
            f"CONFIG_FILE={self.directory / 'rabbitmq.conf'}\n"
            f"MNESIA_BASE={self.directory / 'mnesia'}\n"
            f"LOG_BASE={self.directory / 'log'}\n"
            f"PID_FILE={self.pid_file}\n"
            f"ENABLED_PLUGINS_FILE={self.home / 'enabled_plugins'}\n"
            f"SERVER_ADDITIONAL_ERL_ARGS='-kernel net_ticktime {NET_TICKTIME}'\n"
        )
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {self.host}:{self.amqp_port}\n"
            "loopback_users = none\n"
            "cluster_partition_handling = pause_minority\n"
            "log.console = false\n"
            "log.file.level = warning\n"
        )

    def start(self) -> None:
        assert not self.running, f"{self.name} is already running"
        assert self.namespace is not None
        self.pid_file.unlink(missing_ok=True)
        with (self.directory / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                self.namespace.command(str(RABBITMQ_BIN / "rabbitmq-server")),
                env=environment_with(self.variables()),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
            )


def namespaced_node(namespace: Namespace, directory: Path, home: Path) -> NamespacedNode:
    return NamespacedNode(
        f"rabbit@{namespace.address}",
        MACHINE,
        5672,
        25672,
        directory,
        home,
        namespace=namespace,
    )
