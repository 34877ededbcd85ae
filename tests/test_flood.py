"""A flood of stalled request bodies against a real ``webhook-bridge serve`` and broker.

Hundreds of loopback connections each declare a body of the largest size allowed, send
headers that look genuine (a fresh timestamp, a well-formed signature) and most of the
body, then stall. Only BRIDGE_MAX_BUFFERED_BYTES of those bodies may be held at once: the
rest are answered 503 at once, the process's memory stays bounded, its probes on the
operations port stay ready, and genuine webhooks go through as soon as the flood ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from bridge.samples import sample_body
from tests.conftest import BridgeProcess, Broker, Signer, post_webhook
from tests.operations import get, start_operated, value_of

FLOOD_CONNECTIONS = 500
DECLARED_BYTES = 256 * 1024  # BRIDGE_MAX_BODY_BYTES's default
UNSENT_BYTES = 1024
WRITE_BYTES = 16 * 1024
BUDGET_BYTES = 32 * 1024 * 1024  # BRIDGE_MAX_BUFFERED_BYTES's default
RSS_SLACK_BYTES = 40 * 1024 * 1024
"""Room above the bodies themselves: copies made while reading, and 500 connections."""
FLOOD_SECONDS = 30.0


@dataclass
class Flood:
    """Connections that each sent a head and most of a body, and stalled."""

    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    readers: list[asyncio.StreamReader] = field(default_factory=list)

    async def refused_at_once(self) -> int:
        """How many were already answered 503 (the others hold their share of the budget)."""
        refused = 0
        for reader in self.readers:
            with contextlib.suppress(TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                async with asyncio.timeout(0.01):
                    if b" 503 " in await reader.readuntil(b"\r\n"):
                        refused += 1
        return refused

    def end(self) -> None:
        for writer in self.writers:
            writer.close()


async def stall(port: int, flood: Flood) -> None:
    webhook_id = f"wh_{uuid.uuid4().hex}"
    signature = base64.b64encode(os.urandom(32)).decode()
    head = (
        f"POST /webhooks/openai HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {DECLARED_BYTES}\r\n"
        f"webhook-id: {webhook_id}\r\nwebhook-timestamp: {int(time.time())}\r\n"
        f"webhook-signature: v1,{signature}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    flood.readers.append(reader)
    flood.writers.append(writer)
    body = b"{" + b" " * (DECLARED_BYTES - UNSENT_BYTES - 1)
    with contextlib.suppress(ConnectionError):
        writer.write(head)
        for start in range(0, len(body), WRITE_BYTES):
            writer.write(body[start : start + WRITE_BYTES])
            await writer.drain()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        match = re.search(r"^VmRSS:\s+(\d+) kB", status.read(), re.MULTILINE)
    assert match is not None
    return int(match.group(1)) * 1024


@contextlib.asynccontextmanager
async def peak_rss(pid: int) -> AsyncIterator[Callable[[], int]]:
    """Sample the process's resident memory every 20 ms; yields the peak so far."""
    peak = rss_bytes(pid)

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_bytes(pid))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    try:
        yield lambda: peak
    finally:
        sampler.cancel()


@pytest.mark.broker
@pytest.mark.timeout(120)
async def test_a_flood_of_stalled_bodies_is_bounded_and_genuine_webhooks_go_through_after(
    start_bridge: Callable[..., BridgeProcess], broker: Broker, signer: Signer
) -> None:
    operated = start_operated(start_bridge)
    bridge = operated.bridge
    await operated.wait_ready()
    queue = await broker.bind_queue(bridge.exchange, "#")
    genuine = [sample_body("batch.completed") for _ in range(6)]
    assert await bridge.post_signed(signer, genuine[0]) == 200  # everything warmed up
    baseline = rss_bytes(bridge.process.pid)

    flood = Flood()
    async with asyncio.timeout(FLOOD_SECONDS), peak_rss(bridge.process.pid) as peak:
        await asyncio.gather(*(stall(bridge.port, flood) for _ in range(FLOOD_CONNECTIONS)))
        try:
            during = await bridge.post_signed(signer, genuine[1])
            assert during in (200, 503), "during the flood: at worst 503"
            for _ in range(5):
                assert (await get(operated.url("/readyz")))[0] == 200, "ready during the flood"
                await asyncio.sleep(0.1)
            _, exposition = await get(operated.url("/metrics"))
            refused = await flood.refused_at_once()
        finally:
            flood.end()
        peak_during_flood = peak()

    held = value_of("webhook_bridge_buffered_bytes", exposition)
    assert 0 < held <= BUDGET_BYTES
    counted = value_of('webhook_bridge_requests_total{outcome="over_buffer_budget"}', exposition)
    assert refused >= FLOOD_CONNECTIONS - BUDGET_BYTES // DECLARED_BYTES - 1
    assert counted >= refused
    growth = peak_during_flood - baseline
    assert growth < BUDGET_BYTES + RSS_SLACK_BYTES, (
        f"RSS grew by {growth / 2**20:.0f} MiB (from {baseline / 2**20:.0f} MiB)"
    )

    # The flood's bodies are given back as their connections close, long before they
    # would have timed out (BRIDGE_BODY_TIMEOUT, 10 s).
    async with asyncio.timeout(3):
        while await operated.metric("webhook_bridge_buffered_bytes"):
            await asyncio.sleep(0.05)
    for body in genuine[2:]:
        assert await post_webhook(bridge.url, body, signer.headers(body)) == 200
    accepted = [genuine[0], *([genuine[1]] if during == 200 else []), *genuine[2:]]
    assert sorted(message.body for message in await broker.drain(queue)) == sorted(accepted)
    assert (await get(operated.url("/readyz")))[0] == 200
