"""Hostile input over real sockets: never a 5xx, never a publish without a valid signature.

Requests are written as raw bytes so that headers a well-behaved client refuses to send
(non-ASCII, huge, odd spacing) reach the server too.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import time
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.app import INGRESS, SERVER_OPTIONS, WEBHOOK_PATH, create_app
from bridge.samples import sample_body
from bridge.settings import Settings
from tests.conftest import FakePublisher, Signer, make_settings

VALID_STATUSES = {200, 400, 401, 408, 413, 431}


@pytest.fixture
async def server(settings: Settings, fake_publisher: FakePublisher) -> AsyncIterator[TestServer]:
    async with served(create_app(settings, fake_publisher)) as test_server:
        yield test_server


@contextlib.asynccontextmanager
async def served(app: web.Application) -> AsyncIterator[TestServer]:
    """``app`` on a loopback port, with the server options ``webhook-bridge serve`` uses."""
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server(**SERVER_OPTIONS)
    try:
        yield test_server
    finally:
        await test_server.close()


def chunked_head(headers: dict[str, str]) -> bytes:
    lines = [f"POST {WEBHOOK_PATH} HTTP/1.1", "Host: x", "Transfer-Encoding: chunked"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


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
    server: TestServer, fake_publisher: FakePublisher, signer: Signer
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    head = chunked_head(signer.headers(b"{}"))
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
    async with served(app) as small_server:
        body = sample_body("batch.completed").ljust(2048)
        head = chunked_head(signer.headers(body))
        chunked = b"".join(b"%x\r\n%s\r\n" % (256, body[i : i + 256]) for i in range(0, 2048, 256))
        status, rest = await exchange(small_server.port or 0, head, chunked + b"0\r\n\r\n")
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
    async with served(app) as slow_server:
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


def signed(signer: Signer, body: bytes, **extra: bytes) -> dict[str, bytes]:
    return {name: value.encode() for name, value in signer.headers(body).items()} | extra


async def answered_before_the_body(port: int, head: bytes) -> tuple[int, bytes]:
    """The status and head of the answer to ``head`` alone: the body it declares is never
    sent, so the answer must come sooner than the body's time limit."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        async with asyncio.timeout(5):
            answer = await reader.readuntil(b"\r\n\r\n")
        return int(answer.split()[1]), answer
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"webhook-timestamp": b"1"}, 401),
        ({"webhook-signature": b"v1"}, 400),
        ({"webhook-id": b"\xff"}, 400),
        ({"Content-Encoding": b"gzip"}, 415),
    ],
    ids=["stale", "malformed-signature", "bad-id", "encoded"],
)
async def test_what_the_headers_refuse_is_refused_before_the_body_arrives(
    server: TestServer,
    fake_publisher: FakePublisher,
    signer: Signer,
    change: dict[str, bytes],
    status: int,
) -> None:
    body = sample_body("batch.completed").ljust(256 * 1024)
    head = request_bytes(signed(signer, body, **change), body)
    answer, _ = await answered_before_the_body(server.port or 0, head)
    assert answer == status
    assert fake_publisher.published == []


async def test_a_missing_header_is_refused_before_the_body_arrives(
    server: TestServer, fake_publisher: FakePublisher, signer: Signer
) -> None:
    body = sample_body("batch.completed").ljust(256 * 1024)
    headers = signed(signer, body)
    del headers["webhook-signature"]
    answer, _ = await answered_before_the_body(server.port or 0, request_bytes(headers, body))
    assert answer == 400
    assert fake_publisher.published == []


async def test_a_decompression_bomb_is_refused_without_being_inflated(
    server: TestServer, fake_publisher: FakePublisher, signer: Signer
) -> None:
    bomb = gzip.compress(b"\0" * (10 * 1024 * 1024))
    assert len(bomb) < 20 * 1024
    # Signed with the right secret: even an authentic compressed body is not inflated.
    head = request_bytes(signed(signer, bomb, **{"Content-Encoding": b"gzip"}), bomb)
    answer, answer_head = await answered_before_the_body(server.port or 0, head)
    assert answer == 415
    assert b"Accept-Encoding: identity" in answer_head
    status, _ = await exchange(server.port or 0, head, bomb)
    assert status == 415
    assert fake_publisher.published == []


async def test_bodies_held_at_once_are_bounded_by_the_budget(
    signer: Signer, fake_publisher: FakePublisher
) -> None:
    app = create_app(
        make_settings(signer, max_body_bytes=2048, max_buffered_bytes=3072), fake_publisher
    )
    budget = app[INGRESS].budget
    async with served(app) as budget_server:
        port = budget_server.port or 0
        large = sample_body("batch.completed").ljust(2048)
        stalled_reader, stalled = await asyncio.open_connection("127.0.0.1", port)
        stalled.write(request_bytes(signed(signer, large), large) + large[:100])
        await stalled.drain()
        await wait_until(lambda: budget.held == 2048)

        second = request_bytes(signed(signer, large), large)
        status, rest = await answered_before_the_body(port, second)
        assert status == 503
        assert b"Retry-After: 5" in rest
        assert b"Connection: close" in rest

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(chunked_head(signer.headers(large)) + b"%x\r\n%s\r\n" % (1500, large[:1500]))
        await writer.drain()
        async with asyncio.timeout(10):
            assert int((await reader.readline()).split()[1]) == 503, "chunks over the budget"
        writer.close()

        small = sample_body("batch.completed")
        assert await status_of(port, signed(signer, small), small) == 200, "a small one fits"

        stalled.close()  # the client goes away mid-body: its share comes back
        await stalled_reader.read()
        await wait_until(lambda: budget.held == 0)
        assert await status_of(port, signed(signer, large), large) == 200
    assert [message.body for message in fake_publisher.published] == [small, large]
    exposition = app[INGRESS].metrics.exposition().decode()
    assert 'webhook_bridge_requests_total{outcome="over_buffer_budget"} 2.0' in exposition


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
