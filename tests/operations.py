"""A ``webhook-bridge serve`` process's operations port (BRIDGE_METRICS_PORT), seen from outside."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from tests.conftest import BridgeProcess, free_port


@dataclass
class Operated:
    """A bridge process and the port of its ``/healthz``, ``/readyz`` and ``/metrics``."""

    bridge: BridgeProcess
    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.bridge.process.poll() is not None:
                raise AssertionError(f"bridge exited: {self.bridge.log_path.read_text()}")
            with contextlib.suppress(aiohttp.ClientError):
                if (await get(self.url("/readyz")))[0] == 200:
                    return
            await asyncio.sleep(0.1)
        raise AssertionError("bridge did not become ready")

    async def metric(self, series: str) -> float:
        """One series' value in a scrape, e.g. ``webhook_bridge_buffered_bytes``."""
        return value_of(series, (await get(self.url("/metrics")))[1])


def start_operated(start_bridge: Callable[..., BridgeProcess], **extra: str) -> Operated:
    """Start a bridge (``start_bridge`` from conftest) with an operations port of its own."""
    port = free_port()
    return Operated(start_bridge(BRIDGE_METRICS_PORT=str(port), **extra), port)


async def get(url: str) -> tuple[int, str]:
    """GET on a fresh connection: the status and the text of the answer."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(url) as response,
    ):
        return response.status, await response.text()


def value_of(series: str, exposition: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", exposition, re.MULTILINE)
    assert match is not None, f"{series} is not in the scrape"
    return float(match.group(1))
