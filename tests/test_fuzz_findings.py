"""Failures the publish_path fuzz harness found, kept as regression tests.

Each reproducer is an authentic webhook (signed with the harness's key).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from bridge.app import WEBHOOK_PATH, create_app
from bridge.publisher import Topology
from bridge.settings import Settings
from tests.conftest import AiohttpClient, Broker, Signer

pytest.importorskip("atheris")

from fuzz.publish_path import check
from fuzz.webhook_input import CLOCK, genuine_signature

BATCH_COMPLETED = (
    b'{"id":"evt_1","object":"event","created_at":%d,"type":"batch.completed",'
    b'"data":{"id":"batch_1"}}'
)


def harness_request(body: bytes, *, other_entries: bytes = b"") -> bytes:
    webhook_id, timestamp = "wh_fuzz_finding", str(CLOCK)
    signature = genuine_signature(webhook_id, timestamp, body).encode()
    return (
        f"webhook-id: {webhook_id}\nwebhook-timestamp: {timestamp}\n".encode()
        + b"webhook-signature: "
        + b" ".join(filter(None, [other_entries, signature]))
        + b"\n\n"
        + body
    )


def test_a_non_ascii_signature_entry_is_refused_or_published() -> None:
    """It used to pass verification beside the genuine entry, then fail to encode (a 500)."""
    check(harness_request(BATCH_COMPLETED % CLOCK, other_entries=b"v2,\xff"))


@pytest.mark.parametrize("created_at", [2**32, 10**15])
def test_a_large_created_at_reads_back_in_seconds(created_at: int) -> None:
    """pamqp reads an AMQP timestamp past 2**32 - 1 as milliseconds: such a created_at is
    left out of the properties instead of reaching consumers misread."""
    check(harness_request(BATCH_COMPLETED % created_at))


@pytest.mark.broker
async def test_a_non_ascii_signature_entry_over_http_is_never_a_500(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    broker_topology: Topology,
    broker: Broker,
    signer: Signer,
) -> None:
    client = await aiohttp_client(create_app(settings))
    deadline = time.monotonic() + 15
    while (await client.get("/readyz")).status != 200:
        assert time.monotonic() < deadline, "bridge did not become ready"
        await asyncio.sleep(0.05)
    queue = await broker.bind_queue(settings.exchange, "#")
    body = BATCH_COMPLETED % int(time.time())
    headers = signer.headers(body)
    head = (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
        f"webhook-id: {headers['webhook-id']}\r\n"
        f"webhook-timestamp: {headers['webhook-timestamp']}\r\n"
    ).encode()
    signature = b"webhook-signature: v2,\xff " + headers["webhook-signature"].encode()

    assert client.port is not None
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head + signature + b"\r\n\r\n" + body)
        async with asyncio.timeout(10):
            status = int((await reader.readline()).split()[1])
    finally:
        writer.close()

    assert status < 500
    if status == 200:
        [message] = await broker.drain(queue)
        assert message.body == body
    else:
        assert 400 <= status < 500
        assert await broker.drain(queue) == []
