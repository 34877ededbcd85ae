"""Hostile input over real sockets: never a 5xx, never a publish without a valid signature.

Requests are written as raw bytes so that headers a well-behaved client refuses to send
(non-ASCII, huge, odd spacing) reach the server too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.app import WEBHOOK_PATH, create_app
from bridge.samples import sample_body
from bridge.settings import Settings
from tests.conftest import FakePublisher, Signer, make_settings

VALID_STATUSES = {200, 400, 401, 408, 413, 431}


@pytest.fixture
async def server(settings: Settings, fake_publisher: FakePublisher) -> AsyncIterator[TestServer]:
    test_server = TestServer(create_app(settings, fake_publisher), host="127.0.0.1")
    await test_server.start_server()
    yield test_server
    await test_server.close()


def request_bytes(
    headers: dict[str, bytes], body: bytes, *, content_length: int | None = None
) -> bytes:
    lines = [f"POST {WEBHOOK_PATH} HTTP/1.1".encode(), b"Host: localhost", b"Connection: close"]
    lines += [name.encode() + b": " + value for name, value in headers.items()]
    lines.append(
        b"Content-Length: " + str(len(body) if content_length is None else content_length).encode()
    )
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def exchange(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send a raw request; return the status and the rest of the response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        async with asyncio.timeout(15):
            status_line = await reader.readline()
            rest = await reader.read()
        return int(status_line.split()[1]), rest
    finally:
        writer.close()


async def status_of(port: int, headers: dict[str, bytes], body: bytes) -> int:
    return (await exchange(port, request_bytes(headers, body), body))[0]


header_values = st.one_of(
    st.none(),
    st.just(b""),
    st.binary(max_size=200).map(lambda raw: raw.replace(b"\r", b"").replace(b"\n", b"")),
    st.text(max_size=100).map(lambda text: text.replace("\r", "").replace("\n", "").encode()),
    st.integers(min_value=-(10**30), max_value=10**30).map(lambda n: str(n).encode()),
    st.floats(allow_nan=True).map(lambda f: repr(f).encode()),
    st.lists(
        st.sampled_from([b"v1,", b"v1,abc=", b"v2,x", b",", b"v1", b" ", b"  "]), max_size=60
    ).map(b" ".join),
)
bodies = st.one_of(
    st.binary(max_size=4096),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
        lambda children: (
            st.lists(children, max_size=5)
            | st.dictionaries(st.text(max_size=10), children, max_size=5)
        ),
        max_leaves=30,
    ).map(lambda value: json.dumps(value).encode()),
    st.integers(min_value=1, max_value=5000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.text(min_size=1000, max_size=5000).map(lambda text: json.dumps({"type": text}).encode()),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    webhook_id=header_values,
    timestamp=header_values,
    signature=header_values,
    body=bodies,
)
async def test_arbitrary_headers_and_bodies_never_5xx_and_never_publish(
    server: TestServer,
    fake_publisher: FakePublisher,
    webhook_id: bytes | None,
    timestamp: bytes | None,
    signature: bytes | None,
    body: bytes,
) -> None:
    headers = {
        name: value
        for name, value in (
            ("webhook-id", webhook_id),
            ("webhook-timestamp", timestamp),
            ("webhook-signature", signature),
        )
        if value is not None
    }
    status = await status_of(server.port or 0, headers, body)
    assert status in VALID_STATUSES - {200}
    assert fake_publisher.published == []


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies)
async def test_arbitrary_signed_bodies_are_published_or_quarantined_never_5xx(
    server: TestServer, fake_publisher: FakePublisher, signer: Signer, body: bytes
) -> None:
    headers = {name: value.encode() for name, value in signer.headers(body).items()}
    assert await status_of(server.port or 0, headers, body) == 200
    assert fake_publisher.published[-1].body == body


async def test_ten_thousand_signature_entries_are_refused(
    server: TestServer, fake_publisher: FakePublisher, signer: Signer
) -> None:
    body = sample_body("batch.completed")
    headers = {name: value.encode() for name, value in signer.headers(body).items()}
    headers["webhook-signature"] = (
        b" ".join([b"v1,AAAA"] * 10_000) + b" " + headers["webhook-signature"]
    )
    status = await status_of(server.port or 0, headers, body)
    assert 400 <= status < 500
    assert fake_publisher.published == []
    assert await status_of(server.port or 0, {}, b"{}") == 400, "still serving"


async def test_a_ten_mebibyte_body_is_refused_before_it_is_sent(
    server: TestServer, fake_publisher: FakePublisher, signer: Signer
) -> None:
    headers = {name: value.encode() for name, value in signer.headers(b"{}").items()}
    head = request_bytes(headers, b"", content_length=10 * 1024 * 1024)
    status, _ = await exchange(server.port or 0, head)  # the body is never written
    assert status == 413
    assert fake_publisher.published == []


async def test_a_ten_mebibyte_chunked_body_is_cut_off_at_the_limit(
    server: TestServer, fake_publisher: FakePublisher
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    head = (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        "webhook-id: wh_1\r\nwebhook-timestamp: 1\r\nwebhook-signature: v1,x\r\n\r\n"
    ).encode()
    writer.write(head)
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b" " * 64 * 1024)
    sent = 0
    try:
        for _ in range(160):
            writer.write(chunk)
            await writer.drain()
            sent += 64 * 1024
    except ConnectionError:
        pass  # the server hung up after refusing: exactly what we want
    async with asyncio.timeout(10):
        status_line = await reader.readline()
    writer.close()
    assert int(status_line.split()[1]) == 413
    assert fake_publisher.published == []


async def test_a_chunked_body_over_the_limit_received_whole_is_413(
    signer: Signer, fake_publisher: FakePublisher
) -> None:
    # Headers and every chunk in one write: the body is complete before the handler
    # runs, so it is taken from the buffer at once, and its size checked there.
    app = create_app(make_settings(signer, max_body_bytes=1024), fake_publisher)
    small_server = TestServer(app, host="127.0.0.1")
    await small_server.start_server()
    try:
        body = sample_body("batch.completed").ljust(2048)
        headers = {name: value.encode() for name, value in signer.headers(body).items()}
        head = b"".join(
            [
                f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\n".encode(),
                b"Transfer-Encoding: chunked\r\n",
                *(name.encode() + b": " + value + b"\r\n" for name, value in headers.items()),
                b"\r\n",
            ]
        )
        chunked = b"".join(b"%x\r\n%s\r\n" % (256, body[i : i + 256]) for i in range(0, 2048, 256))
        status, rest = await exchange(small_server.port or 0, head, chunked + b"0\r\n\r\n")
    finally:
        await small_server.close()
    assert status == 413
    assert json.loads(rest.partition(b"\r\n\r\n")[2]) == {
        "error": "too_large",
        "detail": "body over 1024 bytes",
    }
    assert fake_publisher.published == []


async def test_a_slow_body_is_timed_out_while_others_are_served(
    signer: Signer, fake_publisher: FakePublisher
) -> None:
    app: web.Application = create_app(make_settings(signer, body_timeout=1.0), fake_publisher)
    slow_server = TestServer(app, host="127.0.0.1")
    await slow_server.start_server()
    try:
        port = slow_server.port or 0
        body = sample_body("batch.completed")
        headers = {name: value.encode() for name, value in signer.headers(body).items()}
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_bytes(headers, body) + body[:5])
        await writer.drain()
        started = time.monotonic()

        assert await status_of(port, headers, body) == 200, "others are served meanwhile"

        async with asyncio.timeout(10):
            status_line = await reader.readline()
        writer.close()
        assert int(status_line.split()[1]) == 408
        assert time.monotonic() - started < 9
        assert len(fake_publisher.published) == 1
    finally:
        await slow_server.close()
