"""The test Redis: a unique key prefix per test, cleaned up afterwards, and private servers."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis

from bridge.dedup.redis_claims import digest_of, group_of
from tests.brokers import port_is_free
from tests.conftest import BridgeProcess, Broker, Signer, free_port
from tests.history import OpenAILikeSender

REDIS_URL = os.environ.get("BRIDGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PORT_BASE_VARIABLE = "BRIDGE_TEST_REDIS_PORT_BASE"
_next_port = itertools.count(int(os.environ.get(PORT_BASE_VARIABLE) or 0))


# A cluster node also listens on its port + 10000 (the cluster bus), which must exist.
CLUSTER_BUS_OFFSET = 10_000
HIGHEST_CLUSTER_PORT = 65_535 - CLUSTER_BUS_OFFSET


def redis_port(*, cluster_bus: bool = False) -> int:
    """A port for a private ``redis-server``: the next one from ``$BRIDGE_TEST_REDIS_PORT_BASE``
    (a range kept for these tests on a shared machine), or any free one; with
    ``cluster_bus``, one whose cluster bus port (+10000) is free too."""
    if os.environ.get(PORT_BASE_VARIABLE):
        return next(_next_port)
    while True:
        port = free_port()
        if not cluster_bus:
            return port
        if port <= HIGHEST_CLUSTER_PORT and port_is_free(port + CLUSTER_BUS_OFFSET):
            return port


def unique_prefix() -> str:
    return f"test-bridge:{uuid.uuid4().hex[:12]}:"


async def delete_prefixed(client: Redis, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
    if keys:
        await client.delete(*keys)


def in_flight_key(prefix: str, key: str) -> str:
    """Where a claim of ``key`` in flight is held."""
    return f"{prefix}{{{group_of(digest_of(key))}}}:i:{key}"


async def remembering_hashes(client: Redis, prefix: str) -> list[bytes]:
    """The hashes that hold confirmed ids under ``prefix``."""
    return [key async for key in client.scan_iter(match=f"{prefix}{{*}}:c:*", count=1000)]


async def remembers(client: Redis, prefix: str, key: str) -> bool:
    """Whether some hash under ``prefix`` holds ``key``'s digest."""
    digest = digest_of(key)
    for name in await remembering_hashes(client, prefix):
        if await client.hexists(name, digest):
            return True
    return False


@pytest.fixture
async def redis_client() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def redis_prefix(redis_client: Redis) -> AsyncIterator[str]:
    """A key prefix of this test's own; every key under it is deleted afterwards."""
    prefix = unique_prefix()
    try:
        yield prefix
    finally:
        await delete_prefixed(redis_client, prefix)


@dataclass
class PrivateRedis:
    """A ``redis-server`` of this test's own on a free port, to stop and start at will."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    options: tuple[str, ...] = ()
    """More ``--name value`` arguments for ``redis-server``."""
    sentinel_lines: tuple[str, ...] = ()
    """If any: run a Sentinel, with these lines in its (writable) configuration file."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.skip("redis-server is not installed")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            raise AssertionError(f"port {self.port} is taken: choose another {PORT_BASE_VARIABLE}")
        command = [executable]
        if self.sentinel_lines:
            config = self.directory / f"sentinel-{self.port}.conf"
            config.write_text("\n".join(self.sentinel_lines) + "\n")
            command += [str(config), "--sentinel"]
        command += ["--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory)]
        if not self.sentinel_lines:
            command += ["--save", "", "--appendonly", "no"]
        command += self.options
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            time.sleep(0.05)
        raise AssertionError(f"private redis-server on {self.port} did not start")

    def stop(self) -> None:
        """Stop it the hard way (its data goes with it, as in a failover that lost writes)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(redis_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def dedup_bridge_under_load(
    start_bridge: Callable[..., BridgeProcess],
    broker: Broker,
    make_sender: Callable[..., OpenAILikeSender],
    signer: Signer,
    *,
    dedup_url: str,
    on_error: str,
    accepted: int,
) -> tuple[BridgeProcess, str, OpenAILikeSender]:
    """A ready bridge deduplicating through ``dedup_url``, a queue taking everything it
    publishes, and a sender of webhooks that has had ``accepted`` of them answered 2xx."""
    pod = start_bridge(
        BRIDGE_DEDUP_URL=dedup_url,
        BRIDGE_DEDUP_ON_ERROR=on_error,
        BRIDGE_PUBLISH_TIMEOUT="2",
    )
    await pod.wait_ready()
    queue = await broker.bind_queue(pod.exchange, "#")
    sender = make_sender(pod.url, signer, concurrency=8, retry_deadline=60)
    sender.start()
    await sender.wait_accepted(accepted)
    return pod, queue, sender
