"""bench/relay.py: what goes through arrives whole, in order, and no sooner than the delay.

Only lower bounds on time are asserted: a busy machine may hold anything longer.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.relay import broker_address, delaying_relay, start_relay_process, through_relay

DELAY_S = 0.05


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(65536):
        writer.write(chunk)
        await writer.drain()
    writer.close()


@pytest.fixture
async def echo_address() -> AsyncIterator[tuple[str, int]]:
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield "127.0.0.1", server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def round_trip(port: int, message: bytes) -> float:
    """Seconds from writing ``message`` through the relay to reading its echo."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.monotonic()
        writer.write(message)
        assert await reader.readexactly(len(message)) == message
        return time.monotonic() - started
    finally:
        writer.close()


async def test_every_byte_comes_back_in_order_after_the_end_is_passed_on(
    echo_address: tuple[str, int],
) -> None:
    # Many writes of uneven sizes, more than the socket buffers hold, so that reading
    # pauses and resumes on the way.
    pieces = [os.urandom(size) for size in [1, 700, 65536, 3, 200_000, 17] * 20]
    async with delaying_relay(echo_address, DELAY_S) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)

        async def send() -> None:
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
            writer.write_eof()

        sending = asyncio.create_task(send())
        echoed = await reader.read()  # until the echo server's end comes back through
        await sending
        writer.close()

    assert echoed == b"".join(pieces)
    assert relay.holds.bytes == 2 * len(echoed)
    assert relay.holds.shortest_hold_s >= DELAY_S


async def test_nothing_arrives_before_the_delay_each_way(echo_address: tuple[str, int]) -> None:
    async with delaying_relay(echo_address, DELAY_S) as relay:
        first = await round_trip(relay.port, b"ping")
        second = await round_trip(relay.port, b"x" * 100_000)

    assert first >= 2 * DELAY_S
    assert second >= 2 * DELAY_S


async def test_the_relay_process_delays_and_reports_what_it_held(
    echo_address: tuple[str, int], tmp_path: Path
) -> None:
    delay_ms = 20.0
    relay = await start_relay_process(echo_address, delay_ms, tmp_path / "relay.log")
    try:
        took = await round_trip(relay.port, b"through uvloop")
    finally:
        summary = await relay.stop()

    assert relay.process.returncode == 0
    assert took >= 2 * delay_ms / 1000
    assert summary is not None
    assert summary.chunks >= 2
    assert summary.bytes == 2 * len(b"through uvloop")
    assert summary.shortest_hold_ms >= delay_ms
    assert summary.cpu_s is not None


def test_servers_are_pointed_at_the_relay_with_their_credentials_kept() -> None:
    url = "amqp://guest:s3cret@broker.example:5673/vhost?heartbeat=30"

    assert broker_address(url) == ("broker.example", 5673)
    assert broker_address("amqp://guest:guest@127.0.0.1/") == ("127.0.0.1", 5672)
    assert (
        through_relay(url, "127.0.0.1", 40001)
        == "amqp://guest:s3cret@127.0.0.1:40001/vhost?heartbeat=30"
    )
    assert through_relay("amqp://localhost/", "127.0.0.1", 1) == "amqp://127.0.0.1:1/"
