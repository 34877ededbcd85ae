"""The RabbitMQ releases the suite runs against: the machine's 3.10 and Debian 13's 4.0.

Debian 13 ships RabbitMQ 4.0 on Erlang 27, which needs Debian 13's C library, so it runs
from a root of its own: ``debootstrap trixie``, then ``rabbitmq-server`` installed with a
``policy-rc.d`` that keeps the installation from starting a node. The root is built once
and kept beside the image's base under ``/var/cache/openai-webhook-bridge``
(``BRIDGE_IMAGE_CACHE``); ``python -m tests.brokers`` builds it ahead of a run. Every program
of the root runs in a mount namespace of its own with ``/proc`` and ``/dev`` mounted there:
the mounts last exactly as long as the processes that need them, and the machine never
sees them.

A node of either release gets its own node name, data, logs, Erlang cookie, an empty
plugins file and loopback ports; a 4.0 node also gets an epmd and a ``rabbitmqctl`` port
range of its own. The machine's broker on 5672, its node and its data are never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tests.image import CACHE_DIR, _run, debian_mirror

RABBITMQ_BIN = PurePosixPath("/usr/lib/rabbitmq/bin")
EPMD = PurePosixPath("/usr/bin/epmd")
TRIXIE = "trixie"
TRIXIE_PACKAGES = ("rabbitmq-server",)
# RabbitMQ 4.3 refuses what 4.0 only deprecates: denying it here makes 4.0 behave the same.
DENIED_DEPRECATED_FEATURES = (
    "transient_nonexcl_queues",
    "global_qos",
    "queue_master_locator",
    "classic_queue_mirroring",
)
# Inside a root: the data, logs and configuration of the nodes started from it.
NODES_DIRECTORY = PurePosixPath("/var/lib/webhook-bridge-tests")
START_TIMEOUT = 120
BOOTSTRAP_TIMEOUT = 900
# The 4.0 broker's ports are 5682, 25682 (distribution), 4380 (epmd) and 35700-35709
# (rabbitmqctl), each plus the slot: another test run on this machine takes the next slot.
PORT_SLOTS = 8
MACHINE_AMQP_URL = os.environ.get("BRIDGE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def in_root(root: Path, *command: str) -> list[str]:
    """``command`` run inside ``root``, with ``/proc`` and ``/dev`` mounted in a private mount
    namespace: they disappear with the last process that uses them."""
    mount_then_enter = (
        'mount -t proc proc "$0/proc" && mount --bind /dev "$0/dev" && exec chroot "$0" "$@"'
    )
    return [
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", mount_then_enter, str(root), *command,
    ]  # fmt: skip


@dataclass(frozen=True)
class Release:
    """A RabbitMQ installation: the machine's own (no root) or one in a Debian root."""

    version: str
    root: Path | None = None
    denied_deprecated_features: tuple[str, ...] = ()
    khepri: bool = False
    """Whether its clusters keep their metadata in Khepri (Raft) rather than Mnesia."""

    @property
    def id(self) -> str:
        return f"rabbitmq{self.version}"

    def command(self, program: PurePosixPath, *args: str) -> list[str]:
        if self.root is None:
            return [str(program), *args]
        return in_root(self.root, str(program), *args)

    def inside(self, path: Path) -> str:
        """``path`` of this machine as this release's programs see it."""
        if self.root is None:
            return str(path)
        return "/" + str(path.relative_to(self.root))

    @contextlib.contextmanager
    def scratch_directory(self, prefix: str) -> Iterator[Path]:
        """A fresh directory its programs can use, removed on exit."""
        if self.root is None:
            base = Path(tempfile.gettempdir())
        else:
            base = self.root / NODES_DIRECTORY.relative_to("/")
        base.mkdir(parents=True, exist_ok=True)
        directory = Path(tempfile.mkdtemp(dir=base, prefix=f"{prefix}-"))
        try:
            yield directory
        finally:
            shutil.rmtree(directory, ignore_errors=True)


MACHINE = Release("3.10")


def rabbitmq4() -> Release:
    """Debian 13's RabbitMQ 4.0, its root bootstrapped on first use and then cached."""
    mirror = debian_mirror()
    recipe = {
        "suite": TRIXIE,
        "mirror": mirror,
        "packages": TRIXIE_PACKAGES,
        "fixes": ["rabbitmq-server#13157"],
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    root = CACHE_DIR / f"rabbitmq-{TRIXIE}-{key}"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE_DIR / f"{root.name}.lock"):
        if not root.is_dir():
            _bootstrap(root, mirror)
    return Release("4.0", root, DENIED_DEPRECATED_FEATURES, khepri=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Another test run building the same root waits for it rather than building it twice."""
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _bootstrap(root: Path, mirror: str) -> None:
    partial = Path(tempfile.mkdtemp(dir=root.parent, prefix=f"{root.name}.partial-"))
    try:
        _run(
            "debootstrap", "--variant=minbase", TRIXIE, str(partial), mirror,
            timeout=BOOTSTRAP_TIMEOUT,
        )  # fmt: skip
        policy = partial / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\n# Installing a service never starts it here.\nexit 101\n")
        policy.chmod(0o755)
        _run(
            *in_root(
                partial, "env", "DEBIAN_FRONTEND=noninteractive",
                "apt-get", "install", "--yes", "--quiet", "--no-install-recommends",
                *TRIXIE_PACKAGES,
            ),
            timeout=BOOTSTRAP_TIMEOUT,
        )  # fmt: skip
        _run(*in_root(partial, "apt-get", "clean"), timeout=60)
        _let_import_definitions_read_standard_input(partial)
        partial.rename(root)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _let_import_definitions_read_standard_input(root: Path) -> None:
    """4.0.5's ``rabbitmqctl`` wrapper starts ``import_definitions`` with ``-noinput``, so it
    waits forever for definitions on standard input (rabbitmq-server #13157, fixed in 4.0.6).
    The same fix as upstream's: that command may read its input."""
    script = root / "usr/lib/rabbitmq/bin/rabbitmqctl"
    catch_all = "    *)\n        maybe_noinput='noinput'\n"
    text = script.read_text()
    if "*import_definitions*)" not in text:
        assert catch_all in text, f"{script} is not the wrapper the fix was written for"
        fix = "    *import_definitions*)\n        maybe_noinput='input'\n        ;;\n"
        script.write_text(text.replace(catch_all, fix + catch_all))


@dataclass(frozen=True)
class RabbitMQ:
    """A broker the tests publish to: its AMQP URL, and ``rabbitmqctl`` aimed at its node."""

    release: Release
    amqp_url: str
    ctl_command: tuple[str, ...]
    # Added to the test process's environment for ``rabbitmqctl`` (its node's epmd, cookie...).
    ctl_variables: Mapping[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.release.id

    def ctl(self, *args: str, timeout: float = 60, stdin: str | None = None) -> str:
        with subprocess.Popen(
            [*self.ctl_command, *args],
            env=environment_with(self.ctl_variables),
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as process:
            try:
                stdout, stderr = process.communicate(stdin, timeout=timeout)
            except subprocess.TimeoutExpired:
                # The CLI's Erlang VM is a child of its script: stop both.
                os.killpg(process.pid, signal.SIGKILL)
                raise
        if process.returncode != 0:
            # Name only the subcommand: the arguments may hold a (test) password.
            raise AssertionError(
                f"rabbitmqctl {args[0]} on {self.id} exited {process.returncode}: "
                f"{stderr.strip() or stdout.strip()}"
            )
        return stdout

    def write_ctl_program(self, directory: Path) -> Path:
        """A ``rabbitmqctl`` in ``directory`` that runs this broker's: put first on PATH, it
        aims every ``rabbitmqctl`` a test runs at this node."""
        assignments = [f"{name}={value}" for name, value in self.ctl_variables.items()]
        program = directory / "rabbitmqctl"
        program.write_text(
            f'#!/bin/sh\nexec env {shlex.join(assignments)} {shlex.join(self.ctl_command)} "$@"\n'
        )
        program.chmod(0o755)
        return program


MACHINE_BROKER = RabbitMQ(MACHINE, MACHINE_AMQP_URL, ("rabbitmqctl",))
RELEASE_IDS = (MACHINE.id, "rabbitmq4.0")
_under_test = MACHINE_BROKER


def release_named(release_id: str) -> Release:
    """The release of ``RELEASE_IDS`` named ``release_id``."""
    if release_id == MACHINE.id:
        return MACHINE
    release = rabbitmq4()
    assert release.id == release_id, f"no release {release_id}"
    return release


def under_test() -> RabbitMQ:
    """The broker the running test runs against (the machine's unless the test says)."""
    return _under_test


@contextlib.contextmanager
def testing_against(broker: RabbitMQ) -> Iterator[None]:
    global _under_test
    _under_test = broker
    try:
        yield
    finally:
        _under_test = MACHINE_BROKER


def environment_with(variables: Mapping[str, str]) -> dict[str, str]:
    """The test process's environment without its RABBITMQ_* settings, plus ``variables``."""
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("RABBITMQ_")
    }
    environment.update(variables)
    return environment


@dataclass(frozen=True)
class OwnPorts:
    """The epmd and ``rabbitmqctl`` ports of nodes that do not register with the machine's
    epmd, and the AMQP and distribution ports of a single broker among them."""

    amqp: int
    dist: int
    epmd: int
    ctl_range: tuple[int, int]


@contextlib.contextmanager
def reserved_ports() -> Iterator[OwnPorts]:
    """The first slot of ports that is free and not held by another test run."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    for slot in range(PORT_SLOTS):
        ctl_range = (35700 + slot * 10, 35709 + slot * 10)
        ports = OwnPorts(5682 + slot, 25682 + slot, 4380 + slot, ctl_range)
        with (CACHE_DIR / f"rabbitmq-ports-{slot}.lock").open("w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            if all(port_is_free(port) for port in (ports.amqp, ports.dist, ports.epmd)):
                yield ports
                return
    raise AssertionError(f"every one of the {PORT_SLOTS} port slots for RabbitMQ nodes is taken")


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # As the node will bind it: a port left in TIME_WAIT by an earlier node is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def make_home(directory: Path) -> Path:
    """A home for nodes that form one cluster: an Erlang cookie only they know, no plugins."""
    directory.mkdir(parents=True)
    cookie = directory / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(20))
    cookie.chmod(0o400)
    (directory / "enabled_plugins").write_text("[].\n")
    return directory


@dataclass
class Node:
    """One RabbitMQ node of a release, with its own name, data, logs and loopback ports."""

    name: str
    release: Release
    amqp_port: int
    dist_port: int
    directory: Path
    home: Path
    # None: the node registers with the machine's epmd, as the machine's own node does.
    own_ports: OwnPorts | None = None
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False

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

    @property
    def broker(self) -> RabbitMQ:
        return RabbitMQ(
            self.release,
            self.url,
            tuple(self.release.command(RABBITMQ_BIN / "rabbitmqctl", "-n", self.name)),
            self.variables(),
        )

    def variables(self) -> dict[str, str]:
        """What the node's programs need in their environment; the rest is in its env file."""
        variables = {
            "HOME": self.release.inside(self.home),
            "RABBITMQ_CONF_ENV_FILE": self.release.inside(self.directory / "rabbitmq-env.conf"),
        }
        if self.own_ports is not None:
            low, high = self.own_ports.ctl_range
            variables.update(
                ERL_EPMD_ADDRESS="127.0.0.1",
                ERL_EPMD_PORT=str(self.own_ports.epmd),
                RABBITMQ_CTL_DIST_PORT_MIN=str(low),
                RABBITMQ_CTL_DIST_PORT_MAX=str(high),
            )
        return variables

    def write_config(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        inside = self.release.inside
        (self.directory / "rabbitmq-env.conf").write_text(
            f"NODENAME={self.name}\n"
            "NODE_IP_ADDRESS=127.0.0.1\n"
            f"NODE_PORT={self.amqp_port}\n"
            f"DIST_PORT={self.dist_port}\n"
            f"CONFIG_FILE={inside(self.directory / 'rabbitmq.conf')}\n"
            f"MNESIA_BASE={inside(self.directory / 'mnesia')}\n"
            f"LOG_BASE={inside(self.directory / 'log')}\n"
            f"PID_FILE={inside(self.pid_file)}\n"
            f"ENABLED_PLUGINS_FILE={inside(self.home / 'enabled_plugins')}\n"
            "SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'\n"
        )
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            # What RabbitMQ recommends for three nodes: a node cut off from the majority
            # pauses, and rejoins by itself when it sees the others again.
            "cluster_partition_handling = pause_minority\n"
            "log.console = false\n"
            "log.file.level = warning\n"
            + "".join(
                f"deprecated_features.permit.{feature} = false\n"
                for feature in self.release.denied_deprecated_features
            )
        )

    def start(self) -> None:
        assert not self.running, f"{self.name} is already running"
        self.pid_file.unlink(missing_ok=True)
        with (self.directory / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                self.release.command(RABBITMQ_BIN / "rabbitmq-server"),
                env=environment_with(self.variables()),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
            )

    def wait_started(self) -> None:
        self.ctl(
            "wait", self.release.inside(self.pid_file), "--timeout", str(START_TIMEOUT),
            timeout=START_TIMEOUT,
        )  # fmt: skip

    def ctl(self, *args: str, timeout: float = 60) -> str:
        return self.broker.ctl(*args, timeout=timeout)

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

    def stop(self) -> None:
        """Stop the node as an operator would, or kill it if it does not stop in time."""
        if not self.running:
            return
        assert self.process is not None
        try:
            self.ctl("stop")
            self.process.wait(timeout=30)
        except (AssertionError, subprocess.TimeoutExpired):
            self.kill()


@contextlib.contextmanager
def own_epmd(release: Release, ports: OwnPorts) -> Iterator[None]:
    """An epmd on the nodes' own port, for as long as they run. Started here, not by the
    first node or ``rabbitmqctl`` that needs it: that one would outlive them all."""
    process = subprocess.Popen(
        release.command(EPMD, "-port", str(ports.epmd), "-address", "127.0.0.1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while port_is_free(ports.epmd):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"epmd did not listen on {ports.epmd}")
            time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextlib.contextmanager
def running_broker(release: Release) -> Iterator[RabbitMQ]:
    """A single node of ``release`` on ports of its own; stopped and removed on exit."""
    with (
        reserved_ports() as ports,
        own_epmd(release, ports),
        release.scratch_directory("broker") as directory,
    ):
        node = Node(
            f"webhook-bridge-test-{uuid.uuid4().hex[:6]}@localhost",
            release,
            ports.amqp,
            ports.dist,
            directory / "node",
            make_home(directory / "home"),
            ports,
        )
        node.write_config()
        try:
            node.start()
            node.wait_started()
            yield node.broker
        finally:
            node.stop()


if __name__ == "__main__":
    print(rabbitmq4().root)
