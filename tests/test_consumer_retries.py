"""Delivery limits never lose an event: busy ids, store outages and handler retries go
through retry queues the broker does not count, and what is given up ends in the
dead-letter queue; the consumer's checks on age and routing key; concurrency; TLS.

Like every broker test, each runs against RabbitMQ 3.10 and 4.0 (``tests/brokers.py``);
4.0's quorum queues dead-letter a message after 20 requeues unless told otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest

from bridge.archive import ArchiveFollower, ArchiveNotFoundError
from bridge.consumer import (
    ConsumerSettings,
    Delivery,
    EventConsumer,
    InMemoryIdempotencyStore,
    WebhookEvent,
    connect_to_a_node,
    retry_queue_name,
)
from bridge.dedup import ClaimState, StoreUnavailable
from bridge.samples import sample_body
from tests.brokers import MACHINE_AMQP_URL
from tests.conftest import AMQP_URL, Broker, Signer, unique_name
from tests.test_consumer import (
    exchange,
    publish_like_bridge,
    publish_raw,
    ready_count,
    wait_until,
)
from tests.test_tls import Certificates, amqps_url, certificates, tls_relay

__all__ = ["certificates", "exchange", "tls_relay"]  # fixtures used by the tests below


# --- helpers --------------------------------------------------------------------------


def quorum_consumer(
    broker: Broker, exchange: str, *, retry_delays: tuple[float, ...] = (), **options: Any
) -> tuple[EventConsumer, str]:
    """A consumer of a quorum queue with a dead-letter exchange, and that exchange's queue;
    both, and the retry queues of ``retry_delays`` (seconds), deleted after the test."""
    queue, dead_letters = unique_name("test.queue"), unique_name("test.dlx")
    broker.created_queues += [queue, dead_letters]
    broker.created_queues += [retry_queue_name(queue, round(d * 1000)) for d in retry_delays]
    broker.created_exchanges.append(dead_letters)
    consumer = EventConsumer(
        AMQP_URL,
        exchange=exchange,
        patterns=["#"],
        queue=queue,
        quorum=True,
        dead_letter_exchange=dead_letters,
        **options,
    )
    return consumer, dead_letters


@asynccontextmanager
async def running(work: Awaitable[None]) -> AsyncIterator[None]:
    task = asyncio.ensure_future(work)
    try:
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def wait_for(event: asyncio.Event, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        await event.wait()


async def publish_event(
    broker: Broker, exchange: str, signer: Signer, event_type: str = "batch.completed"
) -> str:
    """Publish one signed event as the bridge would; its ``webhook-id``."""
    body = sample_body(event_type)
    headers = signer.headers(body)
    await publish_like_bridge(broker, exchange, body, headers)
    return headers["webhook-id"]


class HeldStore:
    """An in-memory store that another replica seems to hold every id of (``IN_FLIGHT``), or
    that is unreachable (``StoreUnavailable``), until ``let_go``; ``held_long_enough`` is set
    after ``answers`` such answers."""

    def __init__(self, *, unreachable: bool, answers: int) -> None:
        self._store = InMemoryIdempotencyStore()
        self._unreachable = unreachable
        self._answers = answers
        self.refusals = 0
        self.held_long_enough = asyncio.Event()
        self.holding = True

    def let_go(self) -> None:
        self.holding = False

    async def claim(self, message_id: str) -> ClaimState:
        if self.holding:
            self.refusals += 1
            if self.refusals >= self._answers:
                self.held_long_enough.set()
            if self._unreachable:
                raise StoreUnavailable("Redis is unreachable")
            return ClaimState.IN_FLIGHT
        return await self._store.claim(message_id)

    async def done(self, message_id: str) -> None:
        await self._store.done(message_id)

    async def release(self, message_id: str) -> None:
        await self._store.release(message_id)


# --- delivery limits ------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.parametrize("unreachable", [False, True], ids=["busy-id", "store-unreachable"])
async def test_a_message_held_past_the_delivery_limit_is_handled_exactly_once(
    broker: Broker, exchange: str, signer: Signer, unreachable: bool
) -> None:
    limit = 20
    store = HeldStore(unreachable=unreachable, answers=limit + 5)
    consumer, dead_letters = quorum_consumer(
        broker,
        exchange,
        retry_delays=(0.05,),
        idempotency=store,
        busy_retry_seconds=0.05,
        delivery_limit=limit,
    )
    handled: list[Delivery] = []

    async def consume() -> None:
        async for delivery in consumer:
            handled.append(delivery)
            await delivery.ack()

    async with consumer:
        webhook_id = await publish_event(broker, exchange, signer)
        async with running(consume()):
            await wait_for(store.held_long_enough)
            store.let_go()
            await wait_until(lambda: len(handled) == 1, timeout=10)
            await asyncio.sleep(0.3)  # time for a second copy, if there were one
        assert [delivery.message_id for delivery in handled] == [webhook_id]
        # Each trip was a new message: the broker never saw this one redelivered.
        assert handled[0].message.headers.get("x-delivery-count") in (None, 0)
        assert not handled[0].message.redelivered
        for queue in (consumer.queue_name, dead_letters, *consumer.retry_queue_names):
            assert await ready_count(broker, queue) == 0, f"{queue} is empty"
    assert store.refusals > limit


@pytest.mark.broker
async def test_a_handler_failing_twice_is_retried_after_its_backoff_and_not_dead_lettered(
    broker: Broker, exchange: str, signer: Signer
) -> None:
    backoff = 0.2
    consumer, dead_letters = quorum_consumer(broker, exchange, retry_delays=(backoff, 2 * backoff))
    attempts: list[float] = []
    handled = asyncio.Event()

    async def fails_twice(event: WebhookEvent) -> None:
        attempts.append(time.monotonic())
        if len(attempts) <= 2:
            raise RuntimeError("the database is restarting")
        handled.set()

    async with consumer:
        await publish_event(broker, exchange, signer)
        async with running(consumer.run(fails_twice, retries=3, backoff=backoff)):
            await wait_for(handled, timeout=10)
            await asyncio.sleep(0.3)
        assert len(attempts) == 3
        assert attempts[1] - attempts[0] >= backoff
        assert attempts[2] - attempts[1] >= 2 * backoff
        assert await ready_count(broker, dead_letters) == 0
        assert await ready_count(broker, consumer.queue_name) == 0
        assert consumer.rejections == Counter()


@pytest.mark.broker
async def test_a_handler_that_always_fails_ends_in_the_dead_letter_queue_once(
    broker: Broker, exchange: str, signer: Signer
) -> None:
    consumer, dead_letters = quorum_consumer(broker, exchange, retry_delays=(0.05, 0.1))
    attempts: list[int] = []

    async def always_fails(event: WebhookEvent) -> None:
        attempts.append(1)
        raise RuntimeError("cannot handle this one")

    async with consumer:
        webhook_id = await publish_event(broker, exchange, signer, "batch.failed")
        async with running(consumer.run(always_fails, retries=2, backoff=0.05)):
            dead = await broker.get(dead_letters, timeout=10)
            await asyncio.sleep(0.3)
        assert dead.message_id == webhook_id
        assert dead.headers["x-retry-count"] == 2
        assert dead.headers["x-original-routing-key"] == "batch.failed"
        assert len(attempts) == 3, "the first attempt and two retries"
        assert await ready_count(broker, dead_letters) == 0, "dead-lettered once"
        for queue in (consumer.queue_name, *consumer.retry_queue_names):
            assert await ready_count(broker, queue) == 0
        assert consumer.rejections == Counter(handler_failed=1)


@pytest.mark.broker
async def test_queues_declare_their_delivery_limit_and_at_least_once_dead_lettering(
    broker: Broker, exchange: str, signer: Signer
) -> None:
    consumer, dead_letters = quorum_consumer(
        broker, exchange, retry_delays=(0.05,), delivery_limit=7
    )
    async with consumer:
        await publish_event(broker, exchange, signer)
        await (await anext(aiter(consumer))).retry(0.05)
        retry_queue = consumer.retry_queue_names[0]
        queues: dict[str, dict[str, aiormq.abc.FieldValue]] = {
            consumer.queue_name: {
                "x-dead-letter-exchange": dead_letters,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
            retry_queue: {
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": consumer.queue_name,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
                "x-message-ttl": 50,
            },
        }
        for name, arguments in queues.items():
            quorum = {**arguments, "x-queue-type": "quorum", "x-delivery-limit": 7}
            async with broker.connection.channel() as channel:
                await channel.declare_queue(name, durable=True, arguments=quorum)
            with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
                async with broker.connection.channel() as channel:
                    await channel.declare_queue(
                        name, durable=True, arguments={**quorum, "x-delivery-limit": 8}
                    )
        assert retry_queue == f"{consumer.queue_name}.retry.50ms"


# --- what the consumer refuses --------------------------------------------------------


@pytest.mark.broker
async def test_a_message_older_than_max_age_is_dead_lettered(
    broker: Broker, exchange: str, signer: Signer
) -> None:
    consumer, dead_letters = quorum_consumer(
        broker, exchange, max_age=timedelta(hours=1), verify_secrets=[signer.secret]
    )
    old, fresh = sample_body("batch.completed"), sample_body("batch.completed")
    two_hours_ago = int(time.time()) - 2 * 3600
    async with consumer:
        old_headers = signer.headers(old, timestamp=two_hours_ago)
        await publish_like_bridge(broker, exchange, old, old_headers)
        await publish_like_bridge(broker, exchange, fresh, signer.headers(fresh))
        delivery = await anext(aiter(consumer))
        await delivery.ack()
        dead = await broker.get(dead_letters)
    assert delivery.body == fresh
    assert dead.body == old
    assert consumer.rejections == Counter(too_old=1)


@pytest.mark.broker
async def test_a_routing_key_other_than_the_signed_type_is_dead_lettered(
    broker: Broker, exchange: str, signer: Signer
) -> None:
    consumer, dead_letters = quorum_consumer(broker, exchange, verify_secrets=[signer.secret])
    body = sample_body("batch.completed")
    headers = signer.headers(body)
    async with consumer:
        await publish_raw(
            broker,
            exchange,
            body,
            routing_key="batch.failed",
            headers=headers,
            message_id=headers["webhook-id"],
        )
        await publish_like_bridge(broker, exchange, body, headers)
        delivery = await anext(aiter(consumer))
        await delivery.ack()
        dead = await broker.get(dead_letters)
    assert delivery.routing_key == "batch.completed"
    assert dead.routing_key == "batch.failed"
    assert consumer.rejections == Counter(routing_key=1)


@pytest.mark.broker
async def test_validated_is_worked_out_from_the_body_not_the_header(
    broker: Broker, exchange: str, signer: Signer
) -> None:
    consumer, _ = quorum_consumer(broker, exchange, verify_secrets=[signer.secret])
    body = json.dumps(
        {"object": "event", "id": "evt_1", "type": "thing.created", "created_at": 1, "data": {}}
    ).encode()
    headers = {**signer.headers(body), "x-event-validated": "true"}
    async with consumer:
        message = aio_pika.Message(body, headers={**headers, "x-event-validated": True})
        message.message_id = headers["webhook-id"]
        target = await broker.channel.get_exchange(exchange)
        await target.publish(message, routing_key="thing.created")
        delivery = await anext(aiter(consumer))
        await delivery.ack()
    assert not delivery.validated


# --- concurrency ----------------------------------------------------------------------


@pytest.mark.broker
async def test_concurrency_runs_that_many_handlers_at_once(
    broker: Broker, exchange: str, signer: Signer
) -> None:
    concurrency = 3
    consumer, _ = quorum_consumer(broker, exchange, prefetch=1)
    started: list[str] = []
    all_started, finish = asyncio.Event(), asyncio.Event()

    async def waits_for_the_others(event: WebhookEvent) -> None:
        started.append(event.id)
        if len(started) == concurrency:
            all_started.set()
        await finish.wait()

    async with consumer:
        for _ in range(concurrency + 1):
            await publish_event(broker, exchange, signer)
        async with running(consumer.run(waits_for_the_others, concurrency=concurrency)):
            await wait_for(all_started, timeout=10)
            await asyncio.sleep(0.2)
            assert len(started) == concurrency, "no more than `concurrency` at once"
            finish.set()
            await wait_until(lambda: len(started) == concurrency + 1)


# --- the queue without a dead-letter exchange -----------------------------------------


@pytest.mark.broker
@pytest.mark.parametrize(
    ("named", "dead_lettered", "warned"),
    [(True, False, True), (True, True, False), (False, False, False)],
    ids=["named", "named-with-dlx", "temporary"],
)
async def test_a_named_queue_without_dead_letter_exchange_warns_that_rejects_are_dropped(
    broker: Broker,
    exchange: str,
    caplog: pytest.LogCaptureFixture,
    named: bool,
    dead_lettered: bool,
    warned: bool,
) -> None:
    queue, dead_letters = unique_name("test.queue"), unique_name("test.dlx")
    broker.created_queues += [queue, dead_letters]
    broker.created_exchanges.append(dead_letters)
    caplog.set_level(logging.WARNING, logger="bridge.consumer")
    async with EventConsumer(
        AMQP_URL,
        exchange=exchange,
        patterns=["#"],
        queue=queue if named else None,
        dead_letter_exchange=dead_letters if dead_lettered else None,
    ):
        pass
    warnings = [r.getMessage() for r in caplog.records if "dead-letter" in r.getMessage()]
    expected = [f"queue {queue} has no dead-letter exchange: the messages it rejects are dropped"]
    assert warnings == (expected if warned else [])


# --- the AMQP CA file -----------------------------------------------------------------


def test_the_ca_file_setting_is_read_like_the_bridges(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BRIDGE_AMQP_CA_FILE", str(tmp_path / "ca.pem"))
    assert ConsumerSettings.load().amqp_ca_file == tmp_path / "ca.pem"


async def test_an_amqps_url_gets_a_context_trusting_the_ca_file(
    certificates: Certificates,
) -> None:
    contexts: dict[str, ssl.SSLContext | None] = {}

    async def connect(url: str, *, ssl_context: ssl.SSLContext | None, **options: Any) -> str:
        contexts[url] = ssl_context
        return url

    plain, tls = "amqp://127.0.0.1:5672/", "amqps://localhost:5671/"
    await connect_to_a_node(tls, connect, attempt_seconds=1, ca_file=certificates.ca)
    await connect_to_a_node(plain, connect, attempt_seconds=1, ca_file=certificates.ca)
    context = contexts[tls]
    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert [ca["subject"] for ca in context.get_ca_certs()] == [
        ((("commonName", "webhook-bridge test CA"),),)
    ]
    assert contexts[plain] is None


# The TLS relay leads to the machine's broker, whichever release the other tests run against.
async def test_the_consumer_and_the_archive_reader_reach_a_tls_broker_with_the_ca_file(
    signer: Signer, certificates: Certificates, tls_relay: int
) -> None:
    exchange = unique_name("test.webhooks")
    async with await aio_pika.connect(MACHINE_AMQP_URL) as connection:
        channel = await connection.channel()
        await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, auto_delete=True)
        machine = Broker(connection, channel)  # type: ignore[arg-type]  # only publishes
        url = amqps_url(tls_relay)
        async with EventConsumer(
            url, exchange=exchange, patterns=["#"], ca_file=certificates.ca
        ) as consumer:
            body = sample_body("batch.completed")
            await publish_like_bridge(machine, exchange, body, signer.headers(body))
            delivery = await asyncio.wait_for(anext(aiter(consumer)), 5)
            await delivery.ack()
        assert delivery.body == body
        follower = ArchiveFollower(
            url, exchange=exchange, patterns=["#"], since=datetime.now(UTC), ca_file=certificates.ca
        )
        with pytest.raises(ArchiveNotFoundError):  # connected over TLS, found no archive stream
            async with follower:
                pass
        for without_the_ca in (
            EventConsumer(url, exchange=exchange, patterns=["#"], timeout=3),
            ArchiveFollower(url, exchange=exchange, patterns=["#"], since=datetime.now(UTC)),
        ):
            with pytest.raises(ConnectionError, match="CERTIFICATE_VERIFY"):
                async with without_the_ca:
                    pass
