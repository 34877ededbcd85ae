"""A TCP relay that holds every chunk for a fixed time each way: network latency to the broker.

On loopback RabbitMQ confirms in well under a millisecond, which hides how a server copes
when every confirm costs a network round trip. ``python -m bench --broker-latency-ms 2``
runs this relay in front of the broker for the whole run and points every server under
test and the confirm loop at it.

Each direction of each connection is a queue of chunks stamped with their arrival time
(uvloop reads up to 250 kB at a time). A timer writes every chunk that has waited the
delay, in arrival order and in one write, so nothing is reordered or dropped and a burst
of chunks costs one write, not one each. When a socket's send buffer is full
(``pause_writing``, what ``drain()`` waits on) the relay stops reading the other socket
until it empties, so a slow reader holds back the sender as it would over a real link.

Run: ``python -m bench.relay --listen-port 5673 --upstream 127.0.0.1:5672 --delay-ms 2``.
It prints ``listening on HOST:PORT`` once it accepts connections and, stopped by SIGTERM,
one JSON line: the chunks and bytes it relayed and how long it held them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit, urlunsplit

import uvloop

from bench.processes import HOST, clean_environment, cpu_seconds, free_port

_REPOSITORY = Path(__file__).resolve().parent.parent
READY_MARKER = "listening on "
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
AMQP_PORTS = {"amqp": 5672, "amqps": 5671}
TIMER_GRANULARITY_S = 0.001
"""uvloop's timers count whole milliseconds from a clock truncated to the millisecond, so a
timer can fire up to one early. Waits are rounded up to whole milliseconds and each chunk's
age is checked again before it is written: a chunk waits at least the delay, and rarely
more than a millisecond over it."""


@dataclass
class HoldTimes:
    """What the relay wrote and how long each chunk waited, from read to write."""

    chunks: int = 0
    bytes: int = 0
    total_hold_s: float = 0.0
    shortest_hold_s: float = math.inf
    longest_hold_s: float = 0.0

    def add(self, size: int, hold_s: float) -> None:
        self.chunks += 1
        self.bytes += size
        self.total_hold_s += hold_s
        self.shortest_hold_s = min(self.shortest_hold_s, hold_s)
        self.longest_hold_s = max(self.longest_hold_s, hold_s)


class DelayedWriter:
    """Writes each chunk it is given to ``transport`` once the chunk is ``delay_s`` old."""

    def __init__(
        self,
        transport: asyncio.Transport,
        delay_s: float,
        holds: HoldTimes,
        on_ended: Callable[[], None],
    ) -> None:
        self._transport = transport
        self._delay_s = delay_s
        self._holds = holds
        self._on_ended = on_ended
        self._pending: deque[tuple[float, bytes]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._ending = False
        self._discarded = False
        self.ended = False
        """Everything was written and the end of the stream passed on."""

    def push(self, chunk: bytes) -> None:
        if self._discarded:
            return
        self._pending.append((time.monotonic(), chunk))
        if self._timer is None:
            self._wake_when_due()

    def end_after_pending(self) -> None:
        """Pass the end of the stream on once every chunk before it is written."""
        self._ending = True
        if not self._pending and self._timer is None:
            self._end()

    def discard(self) -> None:
        """The socket is gone: drop what waits for it and accept nothing more."""
        self._discarded = True
        self._pending.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake_when_due(self) -> None:
        arrived, _ = self._pending[0]
        wait = arrived + self._delay_s - time.monotonic()
        rounded_up = math.ceil(max(wait, 0.0) / TIMER_GRANULARITY_S) * TIMER_GRANULARITY_S
        self._timer = asyncio.get_running_loop().call_later(rounded_up, self._write_due)

    def _write_due(self) -> None:
        self._timer = None
        now = time.monotonic()
        due: list[bytes] = []
        while self._pending and now - self._pending[0][0] >= self._delay_s:
            arrived, chunk = self._pending.popleft()
            self._holds.add(len(chunk), now - arrived)
            due.append(chunk)
        if due:
            self._transport.write(due[0] if len(due) == 1 else b"".join(due))
        if self._pending:
            self._wake_when_due()
        elif self._ending:
            self._end()

    def _end(self) -> None:
        if self.ended:
            return
        if not self._transport.is_closing():
            if self._transport.can_write_eof():
                self._transport.write_eof()
            else:
                self._transport.close()
        self.ended = True
        self._on_ended()


class RelaySide(asyncio.Protocol):
    """One socket of a relayed connection: what it reads goes, delayed, out of its peer's."""

    def __init__(self, delay_s: float, holds: HoldTimes) -> None:
        self._delay_s = delay_s
        self._holds = holds
        self.transport: asyncio.Transport | None = None
        self.outgoing: DelayedWriter | None = None
        self.peer: RelaySide | None = None
        self.received_eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio's, but have all of Transport.
        self.transport = cast(asyncio.Transport, transport)
        self.outgoing = DelayedWriter(
            self.transport, self._delay_s, self._holds, on_ended=self.close_when_done
        )

    def link(self, peer: RelaySide) -> None:
        self.peer, peer.peer = peer, self

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        assert self.peer.outgoing is not None
        self.peer.outgoing.push(data)

    def eof_received(self) -> bool:
        self.received_eof = True
        if self.peer is not None and self.peer.outgoing is not None:
            self.peer.outgoing.end_after_pending()
        self.close_when_done()
        # Stay half-open: the peer may still have an answer on its way back.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.outgoing is not None:
            self.outgoing.discard()
        peer = self.peer
        if peer is not None and peer.outgoing is not None:
            # Nothing more will come from this side; what it sent still reaches the peer.
            peer.received_eof = True
            peer.outgoing.end_after_pending()

    def close_when_done(self) -> None:
        """Close once nothing more comes in and everything due out has been written."""
        if self.transport is None or self.outgoing is None:
            return
        if self.received_eof and self.outgoing.ended:
            self.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class Relay:
    """A listening relay; every connection it accepts opens its own to ``upstream``."""

    def __init__(self, upstream: tuple[str, int], delay_s: float) -> None:
        self.upstream = upstream
        self.delay_s = delay_s
        self.holds = HoldTimes()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accepted, host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def _accepted(self) -> RelaySide:
        return _ClientSide(self.delay_s, self.holds, self.upstream)


class _ClientSide(RelaySide):
    """The side a client connected to: what it reads before its upstream connection is up
    waits, and no more is read, until it is."""

    def __init__(self, delay_s: float, holds: HoldTimes, upstream: tuple[str, int]) -> None:
        super().__init__(delay_s, holds)
        self._upstream = upstream
        self._connecting: asyncio.Task[None] | None = None
        self._before_upstream: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._connecting = asyncio.get_running_loop().create_task(self._connect_upstream())

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            super().data_received(data)
            return
        # uvloop starts reading right after connection_made, whatever it paused.
        assert self.transport is not None
        self._before_upstream.append(data)
        self.transport.pause_reading()

    async def _connect_upstream(self) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(
                lambda: RelaySide(self._delay_s, self._holds), *self._upstream
            )
        except OSError:
            self.transport.close()
            return
        if self.lost:
            assert upstream.transport is not None
            upstream.transport.close()
            return
        self.link(upstream)
        assert upstream.outgoing is not None
        for chunk in self._before_upstream:
            upstream.outgoing.push(chunk)
        self._before_upstream.clear()
        if self.received_eof:
            upstream.outgoing.end_after_pending()
        self.transport.resume_reading()


@contextlib.asynccontextmanager
async def delaying_relay(
    upstream: tuple[str, int], delay_s: float, host: str = HOST, port: int = 0
) -> AsyncIterator[Relay]:
    """A relay on the running loop, listening on ``host``:``port`` (0: any free port)."""
    relay = Relay(upstream, delay_s)
    await relay.start(host, port)
    try:
        yield relay
    finally:
        relay.close()


# --- as the harness runs it -------------------------------------------------------------------


@dataclass(frozen=True)
class RelaySummary:
    """What a relay run did, for the report."""

    delay_ms: float
    chunks: int
    bytes: int
    mean_hold_ms: float
    shortest_hold_ms: float
    longest_hold_ms: float
    cpu_s: float | None = None
    """The relay process's CPU time over the run (in the machine's column, no server's)."""

    @classmethod
    def of(cls, delay_s: float, holds: HoldTimes) -> RelaySummary:
        def milliseconds(seconds: float) -> float:
            return round(seconds * 1000, 3)

        held = holds.chunks or 1
        return cls(
            delay_ms=milliseconds(delay_s),
            chunks=holds.chunks,
            bytes=holds.bytes,
            mean_hold_ms=milliseconds(holds.total_hold_s / held),
            shortest_hold_ms=milliseconds(holds.shortest_hold_s if holds.chunks else 0.0),
            longest_hold_ms=milliseconds(holds.longest_hold_s),
        )


class RelayFailed(RuntimeError):
    """The relay process did not start listening."""


def broker_address(amqp_url: str) -> tuple[str, int]:
    parts = urlsplit(amqp_url)
    return parts.hostname or HOST, parts.port or AMQP_PORTS.get(parts.scheme, 5672)


def through_relay(amqp_url: str, host: str, port: int) -> str:
    """``amqp_url`` with its host and port replaced by the relay's, credentials kept."""
    parts = urlsplit(amqp_url)
    credentials, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{credentials}{at}{host}:{port}"))


@dataclass
class RelayProcess:
    process: asyncio.subprocess.Process
    delay_ms: float
    host: str
    port: int

    def amqp_url(self, broker_url: str) -> str:
        """``broker_url`` through this relay."""
        return through_relay(broker_url, self.host, self.port)

    async def stop(self) -> RelaySummary | None:
        """SIGTERM to the relay started here, then its summary (None if it printed none)."""
        cpu_s = cpu_seconds([self.process.pid])
        if self.process.returncode is None:
            self.process.terminate()
        assert self.process.stdout is not None
        try:
            output = await asyncio.wait_for(self.process.stdout.read(), STOP_TIMEOUT_S)
            await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            return None
        # After the ready line the relay prints only its summary, as it exits.
        lines = output.decode(errors="replace").splitlines()
        try:
            summary = RelaySummary(**json.loads(lines[-1]))
        except (IndexError, ValueError, TypeError):
            return None
        return RelaySummary(**{**asdict(summary), "cpu_s": round(cpu_s, 2)})


async def start_relay_process(
    upstream: tuple[str, int], delay_ms: float, log_path: Path
) -> RelayProcess:
    """``python -m bench.relay`` on a free port; returns once it accepts connections."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.relay",
            "--listen-port", str(port), "--upstream", f"{upstream[0]}:{upstream[1]}",
            "--delay-ms", str(delay_ms),
            cwd=_REPOSITORY, env=clean_environment(),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log,
        )  # fmt: skip
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), READY_TIMEOUT_S)
    except TimeoutError:
        line = b""
    if not line.decode().startswith(READY_MARKER):
        if process.returncode is None:
            process.kill()
        await process.wait()
        raise RelayFailed(
            f"the broker relay did not start (exit {process.returncode}); see {log_path}"
        )
    return RelayProcess(process, delay_ms, HOST, port)


# --- command line -----------------------------------------------------------------------------


def _address(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    return host, int(port)


async def _serve(host: str, port: int, upstream: tuple[str, int], delay_s: float) -> HoldTimes:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with delaying_relay(upstream, delay_s, host, port) as relay:
        print(f"{READY_MARKER}{host}:{relay.port}", flush=True)
        await stop.wait()
    return relay.holds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay")
    parser.add_argument("--listen-host", default=HOST)
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--upstream", type=_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--delay-ms", type=float, required=True, help="each way")
    args = parser.parse_args(argv)
    delay_s = args.delay_ms / 1000
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        holds = runner.run(_serve(args.listen_host, args.listen_port, args.upstream, delay_s))
    print(json.dumps(asdict(RelaySummary.of(delay_s, holds))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
