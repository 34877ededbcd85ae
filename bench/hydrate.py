"""The ``--hydrate N`` mode: what hydration costs, against the stand-in of OpenAI's API.

N ``batch.completed`` events are queued twice: on the hydration queue and on a plain
consumer queue. A ``webhook-bridge hydrate`` process then fetches every object from the
stand-in (tests/openai_standin.py, the one the suite holds to the SDK, served from this
process) and publishes it; a ``webhook-bridge consume`` process reads the other copy of
every event and acknowledges it, the least a consumer does. Both run as processes of
their own, so their CPU time is their own (``RUSAGE_CHILDREN``): the difference per event
is what hydration adds to consuming, and the objects per second are one worker's
throughput when the API answers at once (``BRIDGE_HYDRATE_RATE`` far above it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection, ExchangeType
from aiohttp.test_utils import TestServer

from bench.processes import run_until_terminated
from bench.results import write_results
from bridge.hydrate import HydrateSettings
from bridge.hydrate.topology import prepare_topology
from bridge.samples import sample_body
from tests.openai_standin import OpenAIStandIn

ROOT = Path(__file__).resolve().parent.parent
OBJECT_PADDING = 1200
"""Bytes of a batch object beyond its id and status: about the size of a real one."""
CONCURRENCY = 32
DEADLINE_SECONDS = 600


@dataclass(frozen=True)
class HydrationReport:
    events: int
    objects_per_second: float
    hydrate_cpu_ms_per_event: float
    consume_cpu_ms_per_event: float
    consume_events_per_second: float

    @property
    def added_cpu_ms_per_event(self) -> float:
        return self.hydrate_cpu_ms_per_event - self.consume_cpu_ms_per_event

    def markdown(self) -> str:
        ratio = self.hydrate_cpu_ms_per_event / self.consume_cpu_ms_per_event
        return "\n".join(
            [
                f"## Hydration ({self.events} batch.completed events, one worker, the stand-in)",
                "",
                "| | per second | CPU per event |",
                "| --- | --- | --- |",
                f"| `consume` (read, acknowledge) | {self.consume_events_per_second:,.0f} events"
                f" | {self.consume_cpu_ms_per_event:.3f} ms |",
                "| `hydrate` (read, fetch, publish, acknowledge) | "
                f"{self.objects_per_second:,.0f} objects"
                f" | {self.hydrate_cpu_ms_per_event:.3f} ms |",
                "",
                f"Hydration adds {self.added_cpu_ms_per_event:.3f} ms of CPU per event, "
                f"{ratio:.1f} x a plain consumer's.",
                "",
            ]
        )

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "added_cpu_ms_per_event": self.added_cpu_ms_per_event}


def run_hydration(events: int, amqp_url: str, results_dir: Path) -> int:
    """The ``--hydrate`` mode: 0 when measured, 2 when a process failed."""
    try:
        report = run_until_terminated(measure(events, amqp_url))
    except (OSError, RuntimeError, TimeoutError) as error:
        print(f"hydration could not be measured: {error}", file=sys.stderr)
        return 2
    run_id = time.strftime("%Y%m%d-%H%M%S")
    path = write_results(results_dir, "hydrate", run_id, report.markdown(), report.as_json())
    print("\n" + report.markdown())
    print(f"written to {path} and .json", flush=True)
    return 0


async def measure(events: int, amqp_url: str) -> HydrationReport:
    standin = OpenAIStandIn()
    server = TestServer(standin.app(), host="127.0.0.1")
    await server.start_server()
    exchange = f"bench.hydrate.{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect_robust(amqp_url, timeout=10)
    settings = HydrateSettings(amqp_url=amqp_url, exchange=exchange, openai_api_key=standin.api_key)
    names = settings.names
    plain_queue, objects_queue = f"{exchange}.consume", f"{exchange}.objects.counted"
    environment = {
        **{key: value for key, value in os.environ.items() if not key.startswith("BRIDGE_")},
        "BRIDGE_AMQP_URL": amqp_url,
        "BRIDGE_EXCHANGE": exchange,
        "BRIDGE_LOG_LEVEL": "WARNING",
        "OPENAI_API_KEY": standin.api_key,
        "OPENAI_BASE_URL": str(server.make_url("/v1")),
        "BRIDGE_HYDRATE_RATE": "10000",
        "BRIDGE_HYDRATE_CONCURRENCY": str(CONCURRENCY),
        "BRIDGE_HYDRATE_METRICS_PORT": "0",
    }
    try:
        async with connection.channel() as channel:
            await channel.declare_exchange(exchange, ExchangeType.TOPIC, durable=True)
        await prepare_topology(connection, settings)
        async with connection.channel() as channel:
            plain = await channel.declare_queue(plain_queue, durable=True)
            await plain.bind(exchange, "batch.*")
            counted = await channel.declare_queue(objects_queue, durable=True)
            await counted.bind(names.objects, "#")
        await _queue_events(connection, standin, exchange, events)
        objects_per_second, hydrate_cpu = await _timed_process(
            ["hydrate"], environment, lambda: _depth(connection, objects_queue), events
        )
        consumed_per_second, consume_cpu = await _timed_process(
            ["consume", "batch.*", "--queue", plain_queue, "--count", str(events), "--json"],
            environment,
            lambda: _consumed(connection, plain_queue, events),
            events,
        )
    finally:
        async with connection.channel() as channel:
            for queue in (plain_queue, objects_queue, names.queue, names.failed):
                with contextlib.suppress(Exception):
                    await channel.queue_delete(queue)
            for name in (names.objects, names.failed, names.objects_unrouted, exchange):
                with contextlib.suppress(Exception):
                    await channel.exchange_delete(name)
        with contextlib.suppress(Exception):
            async with connection.channel() as channel:
                await channel.queue_delete(names.objects_unrouted)
        await connection.close()
        await server.close()
    return HydrationReport(
        events=events,
        objects_per_second=objects_per_second,
        hydrate_cpu_ms_per_event=hydrate_cpu * 1000 / events,
        consume_cpu_ms_per_event=consume_cpu * 1000 / events,
        consume_events_per_second=consumed_per_second,
    )


async def _queue_events(
    connection: AbstractRobustConnection, standin: OpenAIStandIn, exchange: str, events: int
) -> None:
    padding = "x" * OBJECT_PADDING
    async with connection.channel(publisher_confirms=True) as channel:
        target = await channel.get_exchange(exchange, ensure=False)
        for _ in range(events):
            batch_id = f"batch_{uuid.uuid4().hex[:24]}"
            standin.store_object(
                f"/batches/{batch_id}",
                (
                    f'{{"id": "{batch_id}", "object": "batch", "status": "completed", '
                    f'"metadata": {{"padding": "{padding}"}}}}'
                ).encode(),
            )
            webhook_id = f"wh_{uuid.uuid4().hex}"
            await target.publish(
                aio_pika.Message(
                    sample_body("batch.completed", overrides={"data.id": batch_id}),
                    message_id=webhook_id,
                    headers={"webhook-id": webhook_id},
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key="batch.completed",
            )


async def _timed_process(
    arguments: list[str],
    environment: dict[str, str],
    done_count: Any,
    events: int,
) -> tuple[float, float]:
    """Run ``webhook-bridge ARGUMENTS`` until ``done_count()`` reaches ``events``: the rate
    from the first to the last event seen, and the process's CPU seconds (start-up
    included: run enough events for it not to matter)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        *arguments,
        cwd=ROOT,
        env=environment,
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        first = last = None
        deadline = time.monotonic() + DEADLINE_SECONDS
        while True:
            count = await done_count()
            now = time.monotonic()
            if count and first is None:
                first = (now, count)
            if count >= events:
                last = (now, count)
                break
            if now > deadline or process.returncode not in (None, 0):
                raise RuntimeError(f"webhook-bridge {arguments[0]} stopped at {count} of {events}")
            await asyncio.sleep(0.05)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if first is None or last is None:
        raise RuntimeError(f"webhook-bridge {arguments[0]} handled nothing")
    if first[1] == last[1]:  # all between two looks: from the start, start-up included
        first = (started, 0)
    elapsed = max(last[0] - first[0], 1e-9)
    return (last[1] - first[1]) / elapsed, cpu


async def _depth(connection: AbstractRobustConnection, queue: str) -> int:
    async with connection.channel() as channel:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


async def _consumed(connection: AbstractRobustConnection, queue: str, events: int) -> int:
    return events - await _depth(connection, queue)
