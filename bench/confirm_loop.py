"""The broker-side ceiling: confirmed publishes in a loop, with no HTTP at all.

``concurrency`` publishers share one aiormq channel with publisher confirms,
each publishing and awaiting its confirm in turn, for ``duration`` seconds, in
the cheapest way aiormq offers (``wait=False``: no drain wait under the lock).
Messages look like the bridge's (same bodies, properties and headers, persistent,
``mandatory``, to a durable topic exchange with a bound durable queue), so the
broker does the same work per message. With ``--concurrency 1`` the median
confirm time is the floor under any one-connection request latency.

Prints one JSON object. Run:
``python -m bench.confirm_loop --exchange x --concurrency 64 --duration 10``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import aiormq
import uvloop
from pamqp.commands import Basic

from bench.signed_requests import RequestFactory, new_secret
from bench.stats import percentile

SAMPLE_MESSAGES = 512
PUBLISH_TIMEOUT = 5.0


@dataclass(frozen=True)
class ConfirmLoopResult:
    concurrency: int
    duration_s: float
    confirmed: int
    """Confirmed in the measured window."""
    published_total: int
    """Everything published, warm-up included: what the bound queue must hold."""
    failures: int
    cpu_s: float
    """This process's CPU time in the measured window."""
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float


def _messages() -> list[tuple[bytes, str, Basic.Properties]]:
    factory = RequestFactory(new_secret())
    messages = []
    for _ in range(SAMPLE_MESSAGES):
        request = factory.new()
        event_type = json.loads(request.body)["type"]
        properties = Basic.Properties(
            content_type="application/json",
            delivery_mode=2,
            message_id=request.webhook_id,
            message_type=event_type,
            timestamp=datetime.now(tz=UTC),
            headers={**request.headers(), "x-event-validated": True},
            app_id="confirm-loop",
        )
        messages.append((request.body, event_type, properties))
    return messages


async def measure(
    amqp_url: str, exchange: str, concurrency: int, duration_s: float, warmup_s: float
) -> ConfirmLoopResult:
    messages = _messages()
    connection = await aiormq.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        # ``wait=`` is declared on the concrete channel only, not on aiormq's interface.
        assert isinstance(channel, aiormq.Channel)
        await channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        published = 0
        failures = 0
        latencies: list[float] = []

        async def publisher(worker: int, until: float, record: bool) -> None:
            nonlocal published, failures
            position = worker
            while time.perf_counter() < until:
                body, routing_key, properties = messages[position % len(messages)]
                position += concurrency
                started = time.perf_counter()
                published += 1
                try:
                    confirmation = await channel.basic_publish(
                        body,
                        exchange=exchange,
                        routing_key=routing_key,
                        properties=properties,
                        mandatory=True,
                        timeout=PUBLISH_TIMEOUT,
                        # By default aiormq holds the channel lock until its writer task has
                        # drained the frame; a ceiling should not pay for that wait.
                        wait=False,
                    )
                except (aiormq.exceptions.AMQPError, TimeoutError):
                    failures += 1
                    continue
                if not isinstance(confirmation, Basic.Ack):
                    failures += 1
                elif record:
                    latencies.append(time.perf_counter() - started)

        async def phase(seconds: float, record: bool) -> float:
            started = time.perf_counter()
            until = started + seconds
            await asyncio.gather(*(publisher(n, until, record) for n in range(concurrency)))
            return time.perf_counter() - started

        await phase(warmup_s, record=False)
        cpu_started = time.process_time()
        elapsed = await phase(duration_s, record=True)
        cpu_s = time.process_time() - cpu_started
    finally:
        await connection.close()
    latencies.sort()
    return ConfirmLoopResult(
        concurrency=concurrency,
        duration_s=elapsed,
        confirmed=len(latencies),
        published_total=published,
        failures=failures,
        cpu_s=cpu_s,
        rps=len(latencies) / elapsed,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        max_ms=(latencies[-1] if latencies else 0.0) * 1000,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.confirm_loop")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(
            measure(args.amqp_url, args.exchange, args.concurrency, args.duration, args.warmup)
        )
    print(json.dumps(asdict(result)))
    return 0 if result.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
