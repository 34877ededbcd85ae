"""The consumer library against the real broker: typing, acknowledgement, dead-lettering,
idempotency, prefetch, quorum queues and end-to-end signature re-verification."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiormq
import pytest

from bridge.consumer import (
    Delivery,
    EventConsumer,
    ExchangeNotFoundError,
    InMemoryIdempotencyStore,
    WebhookEvent,
)
from bridge.dedup import ClaimState
from bridge.events import EVENT_MODELS, KNOWN_EVENT_TYPES, UnknownWebhookEvent, classify
from bridge.publisher import Topology, route
from bridge.samples import sample_body
from bridge.signature import InvalidSecretError, WebhookHeaders
from tests.conftest import (
    AMQP_URL,
    BridgeProcess,
    Broker,
    Signer,
    new_secret,
    pamqp_properties,
    unique_name,
)

UNKNOWN_BODY = json.dumps(
    {"object": "event", "id": "evt_new", "type": "thing.created", "created_at": 1, "data": {}}
).encode()


# --- without a broker ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"patterns": ["#"], "quorum": True}, "quorum queue needs a name"),
        ({"patterns": ["#"], "prefetch": 0}, "prefetch"),
        ({"patterns": []}, "patterns"),
        ({"patterns": "batch.*"}, "patterns"),
        ({"patterns": ["#"], "verify_secrets": "whsec_x"}, "verify_secrets"),
    ],
    ids=["quorum-without-name", "no-prefetch", "no-patterns", "patterns-string", "secret-string"],
)
def test_impossible_configurations_are_refused(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EventConsumer(AMQP_URL, **arguments)


def test_an_unusable_verification_secret_is_refused_at_construction() -> None:
    with pytest.raises(InvalidSecretError):
        EventConsumer(AMQP_URL, patterns=["#"], verify_secrets=["whsec_"])


async def test_in_memory_idempotency_store_forgets_by_age_and_by_count() -> None:
    now = 1000.0
    store = InMemoryIdempotencyStore(max_ids=2, ttl_seconds=60, clock=lambda: now)
    assert await store.claim("a") is ClaimState.NEW
    await store.done("a")
    assert await store.claim("a") is ClaimState.CONFIRMED
    for message_id in ("b", "c"):
        assert await store.claim(message_id) is ClaimState.NEW
        await store.done(message_id)
    assert await store.claim("a") is ClaimState.NEW, "the oldest id is dropped beyond max_ids"
    assert await store.claim("b") is ClaimState.CONFIRMED
    assert len(store) == 2
    now += 61
    assert await store.claim("c") is ClaimState.NEW
    assert len(store) == 0


async def test_in_memory_idempotency_store_claims_and_releases() -> None:
    store = InMemoryIdempotencyStore()
    assert await store.claim("a") is ClaimState.NEW
    assert await store.claim("a") is ClaimState.IN_FLIGHT
    await store.release("a")
    assert await store.claim("a") is ClaimState.NEW


# --- against the broker -------------------------------------------------------------


@pytest.fixture
async def exchange(broker: Broker) -> str:
    """A durable topic exchange like the bridge's, deleted after the test."""
    name = unique_name("test.webhooks")
    await broker.channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
    broker.created_exchanges.append(name)
    return name


async def publish_like_bridge(
    broker: Broker, exchange: str, body: bytes, headers: dict[str, str]
) -> None:
    """Publish ``body`` with exactly the properties the bridge would give it."""
    topology = Topology(exchange, f"{exchange}.unrouted", f"{exchange}.quarantine")
    message = route(topology, WebhookHeaders.from_mapping(headers), body, classify(body))
    channel = await broker.channel.get_underlay_channel()
    await channel.basic_publish(
        message.body,
        exchange=message.exchange,
        routing_key=message.routing_key,
        properties=pamqp_properties(message.properties),
    )


async def publish_raw(
    broker: Broker,
    exchange: str,
    body: bytes,
    *,
    routing_key: str,
    headers: dict[str, str] | None = None,
    message_id: str | None = None,
) -> None:
    """Publish as any other service with access to the exchange could."""
    target = await broker.channel.get_exchange(exchange)
    message = aio_pika.Message(body, headers=dict(headers or {}), message_id=message_id)
    await target.publish(message, routing_key=routing_key)


def consumer_for(broker: Broker, exchange: str, **options: Any) -> EventConsumer:
    """A consumer whose queue and dead-letter exchange are deleted after the test."""
    options.setdefault("patterns", ["#"])
    if options.get("queue"):
        broker.created_queues.append(options["queue"])
    if options.get("dead_letter_exchange"):
        broker.created_queues.append(options["dead_letter_exchange"])
        broker.created_exchanges.append(options["dead_letter_exchange"])
    return EventConsumer(AMQP_URL, exchange=exchange, **options)


async def next_delivery(deliveries: AsyncIterator[Delivery], timeout: float = 5.0) -> Delivery:
    async with asyncio.timeout(timeout):
        return await anext(deliveries)


@asynccontextmanager
async def running(consumer: EventConsumer, handler: Callable[[WebhookEvent], Any]) -> Any:
    """``consumer.run(handler)`` in the background for the duration of the block."""
    task = asyncio.create_task(consumer.run(handler))
    try:
        yield task
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def ready_count(broker: Broker, queue: str) -> int:
    """Messages ready on ``queue``, asked afresh (a robust channel caches passive declares)."""
    async with broker.connection.channel() as channel:
        declared = await channel.declare_queue(queue, passive=True)
    return declared.declaration_result.message_count or 0


async def settle_time() -> None:
    """Give the broker a moment to apply acks, rejects and dead-lettering."""
    await asyncio.sleep(0.3)


@pytest.mark.broker
async def test_every_event_type_arrives_as_its_model_and_new_types_as_the_envelope(
    broker: Broker, exchange: str, signer: Signer
) -> None:
    bodies = [sample_body(event_type) for event_type in sorted(KNOWN_EVENT_TYPES)]
    bodies.append(UNKNOWN_BODY)
    async with consumer_for(broker, exchange) as consumer:
        deliveries = aiter(consumer)
        sent_headers = []
        for body in bodies:
            sent_headers.append(signer.headers(body))
            await publish_like_bridge(broker, exchange, body, sent_headers[-1])
        for body, headers in zip(bodies, sent_headers, strict=True):
            delivery = await next_delivery(deliveries)
            event_type = json.loads(body)["type"]
            assert delivery.body == body
            assert delivery.routing_key == event_type
            assert delivery.message_id == headers["webhook-id"]
            if event_type in KNOWN_EVENT_TYPES:
                assert type(delivery.event) is EVENT_MODELS[event_type]
                assert delivery.validated
            else:
                assert type(delivery.event) is UnknownWebhookEvent
                assert not delivery.validated
            assert delivery.event.type == event_type
            await delivery.ack()


@pytest.mark.broker
@pytest.mark.parametrize("acknowledge", [True, False], ids=["ack", "no-ack"])
async def test_ack_removes_the_message_and_closing_without_it_returns_it(
    broker: Broker, exchange: str, signer: Signer, acknowledge: bool
) -> None:
    queue = unique_name("test.queue")
    body = sample_body("batch.completed")
    async with consumer_for(broker, exchange, queue=queue) as consumer:
        await publish_like_bridge(broker, exchange, body, signer.headers(body))
        delivery = await next_delivery(aiter(consumer))
        if acknowledge:
            await delivery.ack()
    await settle_time()
    assert await ready_count(broker, queue) == (0 if acknowledge else 1)


@pytest.mark.broker
async def test_reject_without_a_dead_letter_exchange_drops_the_message(
    broker: Broker, exchange: str, signer: Signer
) -> None:
    queue = unique_name("test.queue")
    body = sample_body("batch.failed")
    async with consumer_for(broker, exchange, queue=queue) as consumer:
        await publish_like_bridge(broker, exchange, body, signer.headers(body))
        await (await next_delivery(aiter(consumer))).reject()
    await settle_time()
    assert await ready_count(broker, queue) == 0


@pytest.mark.broker
async def test_reject_dead_letters_to_the_configured_exchange(
    broker: Broker, exchange: str, signer: Signer
) -> None:
    queue, dead_letters = unique_name("test.queue"), unique_name("test.dlx")
    body = sample_body("batch.failed")
    async with consumer_for(
        broker, exchange, queue=queue, dead_letter_exchange=dead_letters
    ) as consumer:
        await publish_like_bridge(broker, exchange, body, signer.headers(body))
        await (await next_delivery(aiter(consumer))).reject()
        dead = await broker.get(dead_letters)
    assert dead.body == body
    assert dead.routing_key == "batch.failed"
    assert await ready_count(broker, queue) == 0


@pytest.mark.broker
async def test_a_failing_handler_rejects_its_message_and_the_loop_goes_on(
    broker: Broker, exchange: str, signer: Signer
) -> None:
    queue, dead_letters = unique_name("test.queue"), unique_name("test.dlx")
    poison, healthy = sample_body("batch.failed"), sample_body("batch.completed")
    handled: list[WebhookEvent] = []

    async def handler(event: WebhookEvent) -> None:
        if event.type == "batch.failed":
            raise RuntimeError("cannot handle this one")
        handled.append(event)

    async with consumer_for(
        broker, exchange, queue=queue, dead_letter_exchange=dead_letters
    ) as consumer:
        for body in (poison, healthy):
            await publish_like_bridge(broker, exchange, body, signer.headers(body))
        async with running(consumer, handler):
            await wait_until(lambda: len(handled) == 1)
            dead = await broker.get(dead_letters)
        await settle_time()
    assert handled[0].id == json.loads(healthy)["id"]
    assert dead.body == poison
    assert await ready_count(broker, queue) == 0


@pytest.mark.broker
async def test_a_body_that_is_not_an_event_is_dead_lettered_without_reaching_the_handler(
    broker: Broker, exchange: str, signer: Signer
) -> None:
    queue, dead_letters = unique_name("test.queue"), unique_name("test.dlx")
    healthy = sample_body("response.completed")
    handled: list[WebhookEvent] = []

    async def handler(event: WebhookEvent) -> None:
        handled.append(event)

    async with consumer_for(
        broker, exchange, queue=queue, dead_letter_exchange=dead_letters
    ) as consumer:
        await publish_raw(
            broker, exchange, b'{"type": "response.completed"}', routing_key="response.completed"
        )
        await publish_like_bridge(broker, exchange, healthy, signer.headers(healthy))
        async with running(consumer, handler):
            await wait_until(lambda: len(handled) == 1)
            dead = await broker.get(dead_letters)
    assert dead.body == b'{"type": "response.completed"}'
    assert handled[0].id == json.loads(healthy)["id"]


@pytest.mark.broker
async def test_a_repeated_message_id_is_handled_once(
    broker: Broker, exchange: str, signer: Signer
) -> None:
    queue = unique_name("test.queue")
    body, other = sample_body("batch.completed"), sample_body("batch.completed")
    headers = signer.headers(body)
    handled: list[WebhookEvent] = []

    async def handler(event: WebhookEvent) -> None:
        handled.append(event)

    store = InMemoryIdempotencyStore()
    async with consumer_for(broker, exchange, queue=queue, idempotency=store) as consumer:
        await publish_like_bridge(broker, exchange, body, headers)
        await publish_like_bridge(broker, exchange, body, headers)
        await publish_like_bridge(broker, exchange, other, signer.headers(other))
        async with running(consumer, handler):
            await wait_until(lambda: len(handled) == 2)
            await settle_time()
            assert await ready_count(broker, queue) == 0, "the skipped copy is acknowledged too"
    assert [event.id for event in handled] == [json.loads(body)["id"], json.loads(other)["id"]]
    assert await store.claim(headers["webhook-id"]) is ClaimState.CONFIRMED


@pytest.mark.broker
@pytest.mark.parametrize("prefetch", [1, 2])
async def test_prefetch_bounds_the_messages_in_flight(
    broker: Broker, exchange: str, signer: Signer, prefetch: int
) -> None:
    queue = unique_name("test.queue")
    async with consumer_for(broker, exchange, queue=queue, prefetch=prefetch) as consumer:
        for _ in range(4):
            body = sample_body("eval.run.succeeded")
            await publish_like_bridge(broker, exchange, body, signer.headers(body))
        first = await next_delivery(aiter(consumer))
        await settle_time()
        assert await ready_count(broker, queue) == 4 - prefetch, "only `prefetch` messages leave"
        await first.ack()
        await settle_time()
        assert await ready_count(broker, queue) == 3 - prefetch


@pytest.mark.broker
async def test_quorum_queues_are_declared_as_quorum_queues(broker: Broker, exchange: str) -> None:
    queue, dead_letters = unique_name("test.queue"), unique_name("test.dlx")
    async with consumer_for(
        broker, exchange, queue=queue, quorum=True, dead_letter_exchange=dead_letters
    ):
        pass
    consumer_queue = {
        "x-dead-letter-exchange": dead_letters,
        "x-delivery-limit": 20,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    dead_letter_queue = {"x-delivery-limit": 2**31 - 1}
    for name, arguments in ((queue, consumer_queue), (dead_letters, dead_letter_queue)):
        async with broker.connection.channel() as channel:
            await channel.declare_queue(
                name, durable=True, arguments={**arguments, "x-queue-type": "quorum"}
            )
        # Declaring an existing quorum queue as classic is refused as inequivalent.
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            async with broker.connection.channel() as channel:
                await channel.declare_queue(
                    name, durable=True, arguments={**arguments, "x-queue-type": "classic"}
                )


@pytest.mark.broker
async def test_binding_to_a_missing_exchange_is_a_clear_error(broker: Broker) -> None:
    missing = unique_name("test.missing")
    with pytest.raises(ExchangeNotFoundError, match=missing):
        async with EventConsumer(AMQP_URL, exchange=missing, patterns=["#"]):
            pass


@pytest.mark.broker
async def test_verification_accepts_what_the_real_bridge_published(
    start_bridge: Callable[..., BridgeProcess], broker: Broker, signer: Signer
) -> None:
    bridge = start_bridge()
    await bridge.wait_ready()
    body = sample_body("fine_tuning.job.succeeded")
    async with consumer_for(
        broker, bridge.exchange, patterns=["fine_tuning.#"], verify_secrets=[signer.secret]
    ) as consumer:
        assert await bridge.post_signed(signer, body) == 200
        delivery = await next_delivery(aiter(consumer))
        assert delivery.body == body
        await delivery.ack()


@pytest.mark.broker
async def test_verification_ignores_the_age_of_a_queued_message(
    broker: Broker, exchange: str, signer: Signer
) -> None:
    body = sample_body("batch.expired")
    two_hours_ago = int(time.time()) - 2 * 3600
    other_secret = new_secret()
    async with consumer_for(
        broker, exchange, verify_secrets=[other_secret, signer.secret]
    ) as consumer:
        await publish_like_bridge(
            broker, exchange, body, signer.headers(body, timestamp=two_hours_ago)
        )
        delivery = await next_delivery(aiter(consumer))
        assert delivery.body == body
        await delivery.ack()


def forged_with_another_secret(signer: Signer, body: bytes) -> tuple[bytes, dict[str, str]]:
    return body, Signer().headers(body)


def forged_by_changing_the_body(signer: Signer, body: bytes) -> tuple[bytes, dict[str, str]]:
    headers = signer.headers(body)
    return body.replace(b"batch_", b"batch_0"), headers


def forged_without_signature(signer: Signer, body: bytes) -> tuple[bytes, dict[str, str]]:
    headers = signer.headers(body)
    del headers["webhook-signature"]
    return body, headers


@pytest.mark.broker
@pytest.mark.parametrize(
    "forge",
    [forged_with_another_secret, forged_by_changing_the_body, forged_without_signature],
    ids=["other-secret", "changed-body", "no-signature"],
)
async def test_verification_dead_letters_forged_messages_and_goes_on(
    broker: Broker,
    exchange: str,
    signer: Signer,
    forge: Callable[[Signer, bytes], tuple[bytes, dict[str, str]]],
) -> None:
    dead_letters = unique_name("test.dlx")
    forged_body, forged_headers = forge(signer, sample_body("batch.completed"))
    genuine = sample_body("batch.completed")
    handled: list[WebhookEvent] = []

    async def handler(event: WebhookEvent) -> None:
        handled.append(event)

    async with consumer_for(
        broker, exchange, dead_letter_exchange=dead_letters, verify_secrets=[signer.secret]
    ) as consumer:
        await publish_raw(
            broker,
            exchange,
            forged_body,
            routing_key="batch.completed",
            headers=forged_headers,
            message_id=forged_headers.get("webhook-id"),
        )
        await publish_like_bridge(broker, exchange, genuine, signer.headers(genuine))
        async with running(consumer, handler):
            await wait_until(lambda: len(handled) == 1)
            dead = await broker.get(dead_letters)
    assert dead.body == forged_body
    assert [event.id for event in handled] == [json.loads(genuine)["id"]]


@pytest.mark.broker
async def test_verification_refuses_a_message_id_other_than_the_signed_webhook_id(
    broker: Broker, exchange: str, signer: Signer
) -> None:
    body = sample_body("batch.completed")
    headers = signer.headers(body)
    queue = unique_name("test.queue")
    async with consumer_for(
        broker, exchange, queue=queue, verify_secrets=[signer.secret]
    ) as consumer:
        await publish_raw(
            broker,
            exchange,
            body,
            routing_key="batch.completed",
            headers=headers,
            message_id="wh_chosen_by_someone_else",
        )
        await publish_like_bridge(broker, exchange, body, headers)
        delivery = await next_delivery(aiter(consumer))
        assert delivery.message_id == headers["webhook-id"]
        await delivery.ack()
    await settle_time()
    assert await ready_count(broker, queue) == 0


# --- the tutorial's examples, run as written against the real bridge -----------------

TUTORIAL = Path(__file__).resolve().parent.parent / "docs" / "tutorials" / "writing-a-consumer.md"


def tutorial_example(heading: str, replacements: dict[str, str]) -> dict[str, Any]:
    """Run the first Python block under ``heading`` with ``replacements`` made, each once."""
    section = TUTORIAL.read_text().split(f"\n{heading}\n", 1)[1]
    source = section.split("```python\n", 1)[1].split("\n```", 1)[0]
    for old, new in replacements.items():
        assert source.count(old) == 1, f"the tutorial's example no longer contains {old!r}"
        source = source.replace(old, new)
    namespace: dict[str, Any] = {"__name__": "tutorial_example"}
    exec(compile(source, str(TUTORIAL), "exec"), namespace)
    return namespace


def unknown_batch_body() -> bytes:
    """An event type OpenAI might add, which ``batch.*`` bindings receive."""
    event = json.loads(sample_body("batch.completed"))
    event["type"] = "batch.archived"
    return json.dumps(event).encode()


async def post_to(bridge: BridgeProcess, signer: Signer, *bodies: bytes) -> None:
    async with aiohttp.ClientSession() as session:
        for body in bodies:
            async with session.post(bridge.url, data=body, headers=signer.headers(body)) as answer:
                assert answer.status == 200


@pytest.mark.broker
async def test_the_tutorial_consumer_example_works_as_written(
    start_bridge: Callable[..., BridgeProcess],
    broker: Broker,
    signer: Signer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bridge = start_bridge()
    await bridge.wait_ready()
    queue, dead_letters = unique_name("test.queue"), unique_name("test.dlx")
    broker.created_queues += [queue, dead_letters]
    broker.created_exchanges.append(dead_letters)
    monkeypatch.setenv("BRIDGE_AMQP_URL", AMQP_URL)
    monkeypatch.setenv("BRIDGE_EXCHANGE", bridge.exchange)
    monkeypatch.setenv("BRIDGE_WEBHOOK_SECRET", signer.secret)
    example = tutorial_example(
        "## The consumer",
        {'queue="billing"': f'queue="{queue}"', '"billing.dlx"': f'"{dead_letters}"'},
    )
    completed, failed, unknown = (
        sample_body("batch.completed"),
        sample_body("batch.failed"),
        unknown_batch_body(),
    )
    forged = sample_body("batch.completed")

    printed: list[str] = []

    def lines_printed(count: int) -> Callable[[], bool]:
        def enough() -> bool:
            printed.extend(capsys.readouterr().out.splitlines())
            return len(printed) >= count

        return enough

    task = asyncio.create_task(example["main"](events_to_handle=100))
    try:
        # Its first line comes once the queue is bound: a message published before that,
        # when the queue may already exist, would be unroutable and lost.
        await wait_until(lines_printed(1), timeout=10)
        await publish_raw(
            broker, bridge.exchange, forged, routing_key="batch.completed", message_id="wh_x"
        )
        await post_to(bridge, signer, completed, failed, unknown)
        await wait_until(lines_printed(4))
        dead = await broker.get(dead_letters)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert printed == [
        f"waiting for batch events on queue {queue}",
        f"batch {json.loads(completed)['data']['id']} completed",
        f"batch {json.loads(failed)['data']['id']} failed",
        "batch.archived: not modelled yet, body kept in delivery.body",
    ]
    assert dead.body == forged


@pytest.mark.broker
async def test_the_tutorial_faststream_example_works_as_written(
    start_bridge: Callable[..., BridgeProcess],
    broker: Broker,
    signer: Signer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("faststream.rabbit")
    bridge = start_bridge()
    await bridge.wait_ready()
    queue = unique_name("test.queue")
    broker.created_queues.append(queue)
    example = tutorial_example(
        "## With FastStream",
        {
            '"amqp://guest:guest@localhost:5672/"': repr(AMQP_URL),
            '"openai.webhooks"': repr(bridge.exchange),
            'RabbitQueue("invoicing"': f"RabbitQueue({queue!r}",
        },
    )
    caplog.set_level(logging.INFO, logger="invoicing")
    completed, failed, unknown = (
        sample_body("batch.completed"),
        sample_body("batch.failed"),
        unknown_batch_body(),
    )

    def logged() -> list[str]:
        return [record.getMessage() for record in caplog.records if record.name == "invoicing"]

    async with example["broker"] as faststream_broker:
        await faststream_broker.start()
        await post_to(bridge, signer, completed, failed, unknown)
        await wait_until(lambda: len(logged()) == 2)
        await settle_time()
    assert logged() == [
        f"batch {json.loads(completed)['data']['id']} completed",
        "batch.archived: not modelled yet",
    ]
    assert await ready_count(broker, queue) == 0


COOKBOOK_EXPECTATIONS = {
    "every batch outcome": {t for t in KNOWN_EVENT_TYPES if t.startswith("batch.")},
    "every failure, across products": {t for t in KNOWN_EVENT_TYPES if t.endswith(".failed")},
    "everything that did not succeed": {
        "agent.environment.expired",
        "agent.environment.failed",
        "agent.session.failed",
        "batch.cancelled",
        "batch.expired",
        "batch.failed",
        "eval.run.canceled",
        "eval.run.failed",
        "fine_tuning.job.cancelled",
        "fine_tuning.job.failed",
        "response.cancelled",
        "response.failed",
        "response.incomplete",
    },
    "only Realtime calls": {"realtime.call.incoming"},
    "calls and sessions for the Live API": {"live.transport.incoming", "live.transport.connected"},
    "agent sessions, every state change": {
        "agent.session.action_required",
        "agent.session.created",
        "agent.session.failed",
        "agent.session.idle",
        "agent.session.in_progress",
    },
    "agent sessions waiting for an action": {"agent.session.action_required"},
    "agent environments changing state (ready, failed, suspended, expired)": {
        "agent.environment.expired",
        "agent.environment.failed",
        "agent.environment.ready",
        "agent.environment.suspended",
    },
    "every safety notice, for the trust and safety team": {
        "safety.alert.created",
        "safety.deactivation_issued",
        "safety.org_alert.created",
        "safety.warning_issued",
    },
    "everything, including types OpenAI adds later": KNOWN_EVENT_TYPES | {"thing.created"},
}


def cookbook_rows() -> dict[str, list[str]]:
    """The tutorial's binding cookbook: what each row receives, and its patterns."""
    section = TUTORIAL.read_text().split("\n### Binding cookbook\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`"):
            rows[cells[0]] = cells[1].replace("`", "").split()
    return rows


@pytest.mark.broker
async def test_the_tutorial_binding_cookbook_receives_what_it_says(
    broker: Broker, exchange: str, signer: Signer
) -> None:
    rows = cookbook_rows()
    assert rows.keys() == COOKBOOK_EXPECTATIONS.keys()
    queues = {
        label: await broker.bind_queue(exchange, *patterns) for label, patterns in rows.items()
    }
    for body in [sample_body(event_type) for event_type in KNOWN_EVENT_TYPES] + [UNKNOWN_BODY]:
        await publish_like_bridge(broker, exchange, body, signer.headers(body))
    await settle_time()
    for label, queue in queues.items():
        received = [message.routing_key or "" for message in await broker.drain(queue)]
        assert sorted(received) == sorted(COOKBOOK_EXPECTATIONS[label]), label
