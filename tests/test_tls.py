"""``amqps://`` to the broker, verified against a configurable CA.

The local RabbitMQ listens without TLS, so the test puts a TLS-terminating relay with a
certificate from a throwaway CA in front of it; the bridge only sees TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from yarl import URL

from bridge.samples import sample_body
from tests.conftest import AMQP_URL, BridgeProcess, Broker, Signer

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not on PATH"),
]


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_certificate: Path
    server_key: Path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=webhook-bridge test CA",
        cwd=tmp_path,
    )  # fmt: skip
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
        "-out", "server.csr", "-subj", "/CN=localhost",
        cwd=tmp_path,
    )  # fmt: skip
    (tmp_path / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "san.ext",
        cwd=tmp_path,
    )  # fmt: skip
    return Certificates(tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key")


@pytest.fixture
async def tls_relay(certificates: Certificates) -> AsyncIterator[int]:
    """A TLS listener on a free port relaying to the plain AMQP port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates.server_certificate, certificates.server_key)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def relay(
        client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        broker = URL(AMQP_URL)
        broker_reader, broker_writer = await asyncio.open_connection(broker.host, broker.port)
        await asyncio.gather(pipe(client_reader, broker_writer), pipe(broker_reader, client_writer))

    server = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=context)
    yield server.sockets[0].getsockname()[1]
    server.close()


def amqps_url(port: int) -> str:
    return str(URL(AMQP_URL).with_scheme("amqps").with_host("localhost").with_port(port))


async def test_amqps_with_a_configured_ca_publishes(
    start_bridge: Callable[..., BridgeProcess],
    broker: Broker,
    signer: Signer,
    certificates: Certificates,
    tls_relay: int,
) -> None:
    bridge = start_bridge(
        BRIDGE_AMQP_URL=amqps_url(tls_relay), BRIDGE_AMQP_CA_FILE=str(certificates.ca)
    )
    await bridge.wait_ready()
    queue = await broker.bind_queue(bridge.exchange, "#")
    body = sample_body("batch.completed")
    assert await bridge.post_signed(signer, body) == 200
    assert (await broker.get(queue)).body == body


async def test_amqps_refuses_a_broker_certificate_it_cannot_verify(
    start_bridge: Callable[..., BridgeProcess], tls_relay: int
) -> None:
    bridge = start_bridge(BRIDGE_AMQP_URL=amqps_url(tls_relay))
    with pytest.raises(AssertionError, match="did not become ready"):
        await bridge.wait_ready(timeout=3)
    assert "CERTIFICATE_VERIFY_FAILED" in bridge.log_path.read_text()
