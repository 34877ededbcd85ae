"""The servers under test: how each is started, and the queues that check its deliveries."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.broker import BrokerProbe, unique_name
from bench.processes import Server, clean_environment, descendants, free_port, start_server
from bench.report import (
    BRIDGE,
    BRIDGE_ARCHIVE,
    BRIDGE_FIXED_LIMIT,
    BRIDGE_REDIS,
    BRIDGE_WORKERS,
    HTTP_CEILING,
    REFERENCE,
)

ROOT = Path(__file__).resolve().parent.parent
BRIDGES = (BRIDGE, BRIDGE_WORKERS, BRIDGE_REDIS, BRIDGE_ARCHIVE, BRIDGE_FIXED_LIMIT)
ARCHIVE_MAX_AGE = "1h"
"""The archive row's retention: the run's stream is deleted afterwards anyway."""
FIXED_IN_FLIGHT_LIMIT = 32
"""The fixed limit the bridge had before it adapted: the comparison row `bridge-fixed32`."""
REDIS_DEDUP_WINDOW_S = 600
"""Short, so that the shared Redis drops the run's keys soon after (TTLs cost nothing), yet
long enough that none expires while the row runs: its memory per id is measured over the
whole row."""


class WorkersUnsupported(Exception):
    """``BRIDGE_WORKERS=2`` was accepted but only one process serves."""


@dataclass(frozen=True)
class UnderTest:
    """A running server plus the queues that tell whether its events arrived."""

    key: str
    server: Server
    counting_queue: str | None
    must_stay_empty: tuple[str, ...] = ()
    processes: int = 1


@dataclass(frozen=True)
class Launch:
    secret: str
    amqp_url: str
    dedup_url: str
    log_dir: Path
    run_id: str
    bridge_command: tuple[str, ...] = (sys.executable, "-m", "bridge", "serve")
    """How the bridge rows start; the soak wraps ``serve`` in its task probe."""


def _start(key: str, launch: Launch) -> tuple[Server, str]:
    port = free_port()
    exchange = unique_name(f"bench.{key}")
    if key in BRIDGES:
        environment = clean_environment(
            BRIDGE_WEBHOOK_SECRET=launch.secret,
            BRIDGE_AMQP_URL=launch.amqp_url,
            BRIDGE_EXCHANGE=exchange,
            BRIDGE_HOST="127.0.0.1",
            BRIDGE_PORT=str(port),
            # Readiness and the publish limit are read from the port the load goes to.
            BRIDGE_METRICS_PORT="0",
            BRIDGE_LOG_LEVEL="WARNING",
            # Secret files mounted on this machine must not change what is measured.
            BRIDGE_SECRETS_DIR=str(launch.log_dir / "no-secrets-dir"),
        )
        if key == BRIDGE_WORKERS:
            environment["BRIDGE_WORKERS"] = "2"
        if key == BRIDGE_REDIS:
            environment.update(
                BRIDGE_DEDUP_URL=launch.dedup_url,
                BRIDGE_DEDUP_KEY_PREFIX=f"bench:{launch.run_id}:{exchange}:",
                BRIDGE_DEDUP_WINDOW=str(REDIS_DEDUP_WINDOW_S),
                # The window must cover twice the tolerance; the run signs as it goes.
                BRIDGE_TIMESTAMP_TOLERANCE=str(REDIS_DEDUP_WINDOW_S // 2),
                # Without Redis every request fails the point instead of skipping the check.
                BRIDGE_DEDUP_ON_ERROR="reject",
            )
        if key == BRIDGE_ARCHIVE:
            environment["BRIDGE_ARCHIVE_MAX_AGE"] = ARCHIVE_MAX_AGE
        if key == BRIDGE_FIXED_LIMIT:
            environment["BRIDGE_MIN_PUBLISHES_IN_FLIGHT"] = str(FIXED_IN_FLIGHT_LIMIT)
            environment["BRIDGE_MAX_PUBLISHES_IN_FLIGHT"] = str(FIXED_IN_FLIGHT_LIMIT)
        command = list(launch.bridge_command)
        ready = "/readyz"
    elif key == REFERENCE:
        environment = clean_environment(BENCH_WEBHOOK_SECRET=launch.secret)
        command = [
            sys.executable, "-m", "bench.reference", "--port", str(port),
            "--exchange", exchange, "--amqp-url", launch.amqp_url,
        ]  # fmt: skip
        ready = "/healthz"
    elif key == HTTP_CEILING:
        environment = clean_environment()
        command = [sys.executable, "-m", "bench.http_ceiling", "--port", str(port)]
        ready = "/healthz"
    else:
        raise ValueError(f"not a server: {key}")
    server = start_server(
        f"{key}-{launch.run_id}",
        command,
        port=port,
        ready_path=ready,
        environment=environment,
        log_dir=launch.log_dir,
        cwd=ROOT,
    )
    return server, exchange


async def prepare(key: str, launch: Launch, probe: BrokerProbe) -> UnderTest:
    """Start ``key``, wait until it is ready and bind its counting queue.

    Raises :class:`WorkersUnsupported` or :class:`bench.processes.ServerFailed`.
    """
    server, exchange = _start(key, launch)
    side_queues: tuple[str, ...] = ()
    if key in BRIDGES:
        side_queues = (f"{exchange}.unrouted", f"{exchange}.quarantine")
        for name in (exchange, *side_queues, f"{exchange}.ingress"):
            probe.forget_exchange(name)
        for name in (*side_queues, f"{exchange}.archive"):
            probe.forget_queue(name)
    elif key == REFERENCE:
        probe.forget_exchange(exchange)
    processes = 1
    try:
        await server.wait_ready(consecutive=5 if key == BRIDGE_WORKERS else 1)
        if key == BRIDGE_WORKERS:
            await asyncio.sleep(1.0)
            processes = 1 + len(descendants(server.process.pid))
            if processes < 2:
                raise WorkersUnsupported(
                    "BRIDGE_WORKERS=2 is accepted but the bridge served from a single "
                    "process, so the workers=2 row was skipped"
                )
        if key == HTTP_CEILING:
            return UnderTest(key, server, None)
        # The servers declare their exchanges at start-up (the bridge with arguments that a
        # plain declaration here would conflict with), so the counting queue is bound after.
        queue = await probe.bind_counting_queue(exchange)
    except BaseException:
        await server.stop()
        raise
    return UnderTest(key, server, queue, side_queues, processes)
