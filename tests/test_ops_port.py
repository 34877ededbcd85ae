"""``/healthz``, ``/readyz`` and ``/metrics`` on a port of their own, with one worker or several."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable

import aiohttp
import pytest

from bridge.app import METRICS_FLUSH_SECONDS, OPERATIONS_PATHS
from bridge.samples import sample_body
from tests.conftest import BridgeProcess, Broker, Signer, bridge_environment, free_port
from tests.operations import get, start_operated

PUBLISHED = 'webhook_bridge_requests_total{outcome="published"}'


@pytest.mark.broker
async def test_operations_answer_on_their_port_and_not_on_the_webhook_port(
    start_bridge: Callable[..., BridgeProcess], broker: Broker, signer: Signer
) -> None:
    operated = start_operated(start_bridge)
    await operated.wait_ready()
    bridge = operated.bridge
    queue = await broker.bind_queue(bridge.exchange, "#")
    for path in OPERATIONS_PATHS:
        assert (await get(operated.url(path)))[0] == 200, path
        assert (await get(f"http://127.0.0.1:{bridge.port}{path}"))[0] == 404, path
    body = sample_body("batch.completed")
    assert await bridge.post_signed(signer, body) == 200
    assert (await broker.get(queue)).body == body
    assert await operated.metric(PUBLISHED) == 1
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            operated.url("/webhooks/openai"), data=body, headers=signer.headers(body)
        ) as response,
    ):
        assert response.status == 404, "no webhook is taken on the operations port"
    assert bridge.stop() == 0


@pytest.mark.broker
async def test_every_worker_answers_the_operations_port_with_every_workers_counts(
    start_bridge: Callable[..., BridgeProcess], broker: Broker, signer: Signer
) -> None:
    operated = start_operated(start_bridge, BRIDGE_WORKERS="2")
    await operated.wait_ready()
    bridge = operated.bridge
    queue = await broker.bind_queue(bridge.exchange, "#")
    bodies = [sample_body("batch.completed") for _ in range(40)]

    async def post(session: aiohttp.ClientSession, body: bytes) -> int:
        async with session.post(bridge.url, data=body, headers=signer.headers(body)) as response:
            return response.status

    # A connection each, so that the kernel spreads them over both workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        assert await asyncio.gather(*(post(session, body) for body in bodies)) == [200] * 40
    await asyncio.sleep(METRICS_FLUSH_SECONDS + 0.5)  # every worker has handed over its counts
    # Each scrape on a fresh connection, answered by either worker: all see all 40.
    assert [await operated.metric(PUBLISHED) for _ in range(8)] == [40] * 8
    assert [(await get(operated.url("/readyz")))[0] for _ in range(8)] == [200] * 8
    assert sorted(message.body for message in await broker.drain(queue)) == sorted(bodies)
    assert bridge.stop() == 0


@pytest.mark.broker
async def test_port_zero_serves_operations_with_the_webhooks(
    start_bridge: Callable[..., BridgeProcess], signer: Signer
) -> None:
    bridge = start_bridge(BRIDGE_METRICS_PORT="0")
    await bridge.wait_ready()
    for path in OPERATIONS_PATHS:
        assert (await get(f"http://127.0.0.1:{bridge.port}{path}"))[0] == 200, path
    assert await bridge.post_signed(signer, sample_body("batch.completed")) == 200
    assert bridge.stop() == 0


def test_one_port_for_both_stops_start_up_with_one_line(signer: Signer) -> None:
    port = free_port()
    environment = bridge_environment(signer, "unused", port, BRIDGE_METRICS_PORT=str(port))
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "serve"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert f"BRIDGE_METRICS_PORT ({port}) is BRIDGE_PORT too" in line
    assert "0 to serve /healthz, /readyz and /metrics on BRIDGE_PORT" in line
