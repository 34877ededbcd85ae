"""A three-node RabbitMQ cluster of the tests' own, on loopback ports of its own.

Each node has its own node name, ports, data and log directories, an empty plugins file
(so no management or metrics listener collides with anything) and an Erlang cookie that
only this cluster knows: the machine's own broker on 5672, its node and its data are never
touched. Nodes are killed, paused and restarted by the process id in their own pid file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
CLUSTER_SIZE = 3
START_TIMEOUT = 120

needs_rabbitmq_server = pytest.mark.skipif(
    not (RABBITMQ_BIN / "rabbitmq-server").exists(), reason="RabbitMQ server is not installed"
)


@dataclass
class Node:
    name: str
    amqp_port: int
    dist_port: int
    directory: Path
    home: Path
    log_file: Path = field(init=False)
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False

    def __post_init__(self) -> None:
        self.log_file = self.directory / "server.log"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def address(self) -> str:
        """``host:port`` as the bridge names the node it is connected to."""
        return f"127.0.0.1:{self.amqp_port}"

    @property
    def pid_file(self) -> Path:
        return self.directory / "rabbitmq.pid"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def environment(self) -> dict[str, str]:
        environment = {
            key: value for key, value in os.environ.items() if not key.startswith("RABBITMQ_")
        }
        environment.update(
            HOME=str(self.home),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.directory / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.directory / "log"),
            RABBITMQ_PID_FILE=str(self.pid_file),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.home / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.directory / "rabbitmq.conf"),
        )
        return environment

    def write_config(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            # What RabbitMQ recommends for three nodes: a node cut off from the majority
            # pauses, and rejoins by itself when it sees the others again.
            "cluster_partition_handling = pause_minority\n"
            "log.console = false\n"
            "log.file.level = warning\n"
        )

    def start(self) -> None:
        assert not self.running, f"{self.name} is already running"
        self.pid_file.unlink(missing_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
            )

    def wait_started(self) -> None:
        self.ctl("wait", str(self.pid_file), "--timeout", str(START_TIMEOUT), timeout=START_TIMEOUT)

    def ctl(self, *args: str, timeout: float = 60) -> str:
        result = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, *args],
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl {args[0]} on {self.name} exited {result.returncode}: "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result.stdout

    def beam_pid(self) -> int:
        return int(self.pid_file.read_text().strip())

    def kill(self) -> None:
        """SIGKILL the Erlang VM: the node dies at once, its TCP connections are reset."""
        assert self.process is not None
        os.kill(self.beam_pid(), signal.SIGKILL)
        self.process.wait(timeout=30)

    def pause(self) -> None:
        """SIGSTOP the Erlang VM: connections stay open but nothing is answered."""
        os.kill(self.beam_pid(), signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        os.kill(self.beam_pid(), signal.SIGCONT)
        self.paused = False


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
def running_cluster(directory: Path) -> Iterator[Cluster]:
    """Start a fresh cluster under ``directory``; kill its nodes and remove it on exit."""
    home = directory / "home"
    home.mkdir(parents=True)
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(20))
    cookie.chmod(0o400)
    (home / "enabled_plugins").write_text("[].\n")
    prefix = f"webhook-bridge-test-{uuid.uuid4().hex[:6]}"
    cluster = Cluster(
        [
            Node(f"{prefix}-{n}@localhost", free_port(), free_port(), directory / f"n{n}", home)
            for n in range(1, CLUSTER_SIZE + 1)
        ]
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
