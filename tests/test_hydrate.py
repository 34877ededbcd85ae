"""``webhook-bridge hydrate`` against the real RabbitMQ and the stand-in of OpenAI's API.

Every test asserts on what reached a queue bound to ``<exchange>.objects`` (or the failed
queue): routing key, exact bytes, properties, and how many messages per ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import openai
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection, ExchangeType
from aiohttp.test_utils import TestClient, TestServer
from pydantic import ValidationError

from bridge.consumer import ObjectConsumer, retry_queue_name
from bridge.dedup.idempotency import RedisIdempotencyStore
from bridge.events import KNOWN_EVENT_TYPES
from bridge.hydrate import HYDRATIONS, HydrateSettings, Hydration, HydrationNames, hydration_for
from bridge.hydrate.api import OpenAIFetcher
from bridge.hydrate.fetching import retry_after_seconds
from bridge.hydrate.service import openai_fetcher, serve_worker
from bridge.hydrate.topology import prepare_topology
from bridge.hydrate.worker import (
    EVENT_ID_HEADER,
    EVENT_TYPE_HEADER,
    FAILURE_HEADER,
    OBJECT_TYPE_HEADER,
    STALE_HEADER,
    HydrationWorker,
    operations_app,
)
from bridge.samples import sample_body
from bridge.settings import SettingsError
from bridge.sources import SOURCE_HEADER
from tests.conftest import AMQP_URL, free_port, unique_name
from tests.openai_standin import OpenAIStandIn
from tests.redis_support import REDIS_URL, delete_prefixed, redis_client

__all__ = ["redis_client"]  # a fixture used below

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parent.parent
WAIT = 60.0
OBJECT_TYPES = {
    "batch.*": "batch",
    "response.*": "response",
    "fine_tuning.job.*": "fine_tuning.job",
    "video.*": "video",
    "agent.session.*": "agent.session",
    "agent.environment.*": "agent.environment",
    "safety.alert.created": "safety.alert",
    "safety.org_alert.created": "safety.alert",
    "safety.warning_issued": "safety.case",
    "safety.deactivation_issued": "safety.case",
}
SDK_TYPES = {
    "batch.*": "Batch",
    "response.*": "Response",
    "fine_tuning.job.*": "FineTuningJob",
    "video.*": "Video",
    "agent.session.*": "AgentSession",
    "agent.environment.*": "EnvironmentInfo",
    "safety.alert.created": "SafetyAlert",
    "safety.org_alert.created": "SafetyAlert",
    "safety.warning_issued": "SafetyCase",
    "safety.deactivation_issued": "SafetyCase",
}
# Every hydratable type the bridge models, and a video event, which it does not model.
HYDRATABLE_TYPES = sorted(
    [event_type for event_type in KNOWN_EVENT_TYPES if hydration_for(event_type)]
    + ["video.completed"]
)


def object_bytes(event_type: str, object_id: str) -> bytes:
    """An object as the API might lay it out: indented, unsorted keys, escapes kept, so
    that any re-encoding on the way shows."""
    hydration = hydration_for(event_type)
    assert hydration is not None
    status = hydration.expected_status(event_type) or "active"
    object_type = OBJECT_TYPES[hydration.family]
    lines = (
        "{",
        f'  "status": "{status}",',
        f'  "id": "{object_id}",',
        f'  "object": "{object_type}",',
        '  "note": "caf\\u00e9 \\/ \u2603",',
        '  "created_at": 1750000000',
        "}",
    )
    return ("\n".join(lines) + "\n").encode()


def event_body(event_type: str, object_id: str) -> bytes:
    if event_type in KNOWN_EVENT_TYPES:
        return sample_body(event_type, overrides={"data.id": object_id})
    envelope = {
        "object": "event",
        "id": f"evt_{uuid.uuid4().hex}",
        "type": event_type,
        "created_at": int(time.time()),
        "data": {"id": object_id},
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def object_id_for(event_type: str) -> str:
    prefix = event_type.split(".")[0]
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


@dataclass
class Sent:
    event_type: str
    object_id: str
    webhook_id: str
    body: bytes
    headers: dict[str, Any]


@dataclass
class Hydrating:
    """One test's exchange, stand-in, broker connection and workers."""

    standin: OpenAIStandIn
    base_url: str
    exchange: str
    connection: AbstractRobustConnection
    objects_queue: str = ""
    workers: list[tuple[HydrationWorker, asyncio.Task[None]]] = field(default_factory=list)

    def settings(self, **overrides: Any) -> HydrateSettings:
        options: dict[str, Any] = {
            "amqp_url": AMQP_URL,
            "exchange": self.exchange,
            "openai_api_key": self.standin.api_key,
            "openai_base_url": self.base_url,
            "hydrate_rate": 1000.0,
            "hydrate_backoff": 0.01,
            "hydrate_requeue_delay": 0.2,
            "hydrate_metrics_port": 0,
        }
        options.update(overrides)
        return HydrateSettings(**options)

    async def start_worker(
        self, settings: HydrateSettings | None = None, **options: Any
    ) -> HydrationWorker:
        settings = settings or self.settings()
        worker = HydrationWorker(settings, openai_fetcher(settings), **options)
        task = asyncio.create_task(worker.run())
        self.workers.append((worker, task))
        await until(lambda: worker.ready or task.done(), "the worker is ready")
        if task.done():
            task.result()
        return worker

    async def stop_workers(self) -> None:
        for worker, _ in self.workers:
            worker.stop()
        for worker, task in self.workers:
            await asyncio.wait_for(task, WAIT)
            await worker._fetcher.close()
        self.workers.clear()

    async def publish_event(
        self,
        event_type: str,
        *,
        object_id: str | None = None,
        webhook_id: str | None = None,
        source: str | None = None,
        body: bytes | None = None,
    ) -> Sent:
        """An event as the bridge publishes it to the main exchange."""
        object_id = object_id or object_id_for(event_type)
        webhook_id = webhook_id or f"wh_{uuid.uuid4().hex}"
        body = body or event_body(event_type, object_id)
        headers: dict[str, Any] = {
            "webhook-id": webhook_id,
            "webhook-signature": "v1,c2lnbmF0dXJl",
            "webhook-timestamp": str(int(time.time())),
            "traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
            "x-event-validated": True,
        }
        if source is not None:
            headers[SOURCE_HEADER] = source
        async with self.connection.channel(publisher_confirms=True) as channel:
            exchange = await channel.get_exchange(self.exchange, ensure=False)
            await exchange.publish(
                aio_pika.Message(
                    body,
                    headers=headers,
                    message_id=webhook_id,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=event_type,
                mandatory=True,
            )
        return Sent(event_type, object_id, webhook_id, body, headers)

    def store(self, sent_or_type: str, object_id: str, *bodies: bytes) -> None:
        hydration = hydration_for(sent_or_type)
        assert hydration is not None
        self.standin.store_object(hydration.path_for(object_id), *bodies)

    async def publish_hydratable(self, event_type: str, **options: Any) -> Sent:
        object_id = object_id_for(event_type)
        self.store(event_type, object_id, object_bytes(event_type, object_id))
        return await self.publish_event(event_type, object_id=object_id, **options)

    async def take(self, queue: str, count: int) -> list[AbstractIncomingMessage]:
        """``count`` messages from ``queue`` (failing after a minute without them)."""
        taken: list[AbstractIncomingMessage] = []
        deadline = time.monotonic() + WAIT
        async with self.connection.channel() as channel:
            source = await channel.get_queue(queue, ensure=False)
            while len(taken) < count:
                message = await source.get(no_ack=True, fail=False)
                if message is not None:
                    taken.append(message)
                    continue
                if time.monotonic() > deadline:
                    raise AssertionError(f"{len(taken)} of {count} messages on {queue}")
                await asyncio.sleep(0.02)
        return taken

    async def depth(self, queue: str) -> int:
        async with self.connection.channel() as channel:
            declared = await channel.declare_queue(queue, passive=True)
            count = declared.declaration_result.message_count
            return int(count or 0)


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


async def until_async(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT} s: {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def hydrating() -> AsyncIterator[Hydrating]:
    standin = OpenAIStandIn()
    server = TestServer(standin.app(), host="127.0.0.1")
    await server.start_server()
    exchange = unique_name("test.hydrate")
    connection = await aio_pika.connect_robust(AMQP_URL, timeout=10)
    state = Hydrating(standin, str(server.make_url("/v1")), exchange, connection)
    try:
        async with connection.channel() as channel:
            await channel.declare_exchange(exchange, ExchangeType.TOPIC, durable=True)
        settings = state.settings()
        await prepare_topology(connection, settings)
        async with connection.channel() as channel:
            queue = await channel.declare_queue(unique_name("test.objects"), durable=True)
            await queue.bind(settings.names.objects, routing_key="#")
            state.objects_queue = queue.name
        yield state
    finally:
        await state.stop_workers()
        names = state.settings().names
        async with connection.channel() as channel:
            queues = [names.queue, names.failed, names.objects_unrouted, state.objects_queue]
            queues += [retry_queue_name(names.queue, delay) for delay in (200, 1000)]
            for queue_name in queues:
                await channel.queue_delete(queue_name)
            for exchange_name in (names.objects, names.failed, names.objects_unrouted, exchange):
                await channel.exchange_delete(exchange_name)
        await connection.close()
        await server.close()


def assert_object(message: AbstractIncomingMessage, sent: Sent, *, stale: bool = False) -> None:
    hydration = hydration_for(sent.event_type)
    assert hydration is not None
    assert message.routing_key == sent.event_type
    assert message.body == object_bytes(sent.event_type, sent.object_id)
    assert message.message_id == sent.webhook_id
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    event = json.loads(sent.body)
    expected = {
        "webhook-id": sent.webhook_id,
        EVENT_ID_HEADER: event["id"],
        EVENT_TYPE_HEADER: sent.event_type,
        OBJECT_TYPE_HEADER: OBJECT_TYPES[hydration.family],
        "traceparent": sent.headers["traceparent"],
    }
    if SOURCE_HEADER in sent.headers:
        expected[SOURCE_HEADER] = sent.headers[SOURCE_HEADER]
    if stale:
        expected[STALE_HEADER] = True
    assert message.headers == expected


def one_per_webhook_id(messages: list[AbstractIncomingMessage]) -> Counter[str | None]:
    return Counter(message.message_id for message in messages)


async def test_the_standin_answers_the_sdk_for_every_hydration(hydrating: Hydrating) -> None:
    """The paths of the table are the SDK's own: its typed retrieve reads each object."""
    client = openai.AsyncOpenAI(
        api_key=hydrating.standin.api_key, base_url=hydrating.base_url, max_retries=0
    )
    expected_paths = []
    async with client:
        for hydration in HYDRATIONS:
            event_type = hydration.family.replace("*", "completed")
            object_id = object_id_for(event_type)
            expected_paths.append(f"/v1{hydration.path_for(object_id)}")
            hydrating.store(event_type, object_id, object_bytes(event_type, object_id))
            *resource_path, method = hydration.sdk_method.split(".")
            resource: Any = client
            for name in resource_path:
                resource = getattr(resource, name)
            retrieved = await getattr(resource, method)(object_id)
            assert (type(retrieved).__name__, retrieved.id) == (
                SDK_TYPES[hydration.family],
                object_id,
            )
    called = [path for method, path, _ in hydrating.standin.requests if method == "GET"]
    assert called == expected_paths


async def test_every_hydratable_type_arrives_as_the_apis_exact_bytes(
    hydrating: Hydrating, tmp_path: Path
) -> None:
    settings = hydrating.settings(sources="main")
    settings.load_source_keys(tmp_path, {"OPENAI_API_KEY_MAIN": hydrating.standin.api_key})
    await hydrating.start_worker(settings)
    sent = [
        await hydrating.publish_hydratable(event_type, source="main" if index % 2 else None)
        for index, event_type in enumerate(HYDRATABLE_TYPES)
    ]
    # Not bound to the hydration queue: never fetched.
    for event_type in ("eval.run.succeeded", "realtime.call.incoming", "live.call.incoming"):
        await hydrating.publish_event(event_type)
    messages = await hydrating.take(hydrating.objects_queue, len(sent))
    by_id = {message.message_id: message for message in messages}
    for each in sent:
        assert_object(by_id[each.webhook_id], each)
    await hydrating.stop_workers()
    assert await hydrating.depth(hydrating.objects_queue) == 0
    assert await hydrating.depth(hydrating.settings().names.failed) == 0
    assert await hydrating.depth(hydrating.settings().names.queue) == 0
    paths = [path for method, path, _ in hydrating.standin.requests if method == "GET"]
    assert sorted(paths) == sorted(
        f"/v1{hydration_for(each.event_type).path_for(each.object_id)}"  # type: ignore[union-attr]
        for each in sent
    )
    beta = [headers.get("OpenAI-Beta") for _, path, headers in hydrating.standin.requests]
    assert all(
        (value == "agents=v1") == ("/agents/" in path)
        for value, (_, path, _) in zip(beta, hydrating.standin.requests, strict=True)
    )


async def test_a_429_pauses_the_worker_for_its_retry_after(hydrating: Hydrating) -> None:
    hydrating.standin.rate_limited_calls = 2
    hydrating.standin.retry_after = "1"
    worker = await hydrating.start_worker()
    sent = [await hydrating.publish_hydratable("batch.completed") for _ in range(3)]
    messages = await hydrating.take(hydrating.objects_queue, 3)
    assert one_per_webhook_id(messages) == Counter(each.webhook_id for each in sent)
    assert sample(worker, "webhook_bridge_hydrate_retries_total", reason="rate_limited") == 2
    assert sample(worker, "webhook_bridge_hydrate_rate_limit_waits_total") >= 1
    assert sample(worker, "webhook_bridge_hydrate_rate_limit_wait_seconds_total") > 0


async def test_server_errors_are_retried_until_the_object_comes(hydrating: Hydrating) -> None:
    worker = await hydrating.start_worker()
    object_id = object_id_for("response.completed")
    path = f"/v1/responses/{object_id}"
    hydrating.standin.failures[path] = [503, 500, 502]
    hydrating.store("response.completed", object_id, object_bytes("response.completed", object_id))
    sent = await hydrating.publish_event("response.completed", object_id=object_id)
    [message] = await hydrating.take(hydrating.objects_queue, 1)
    assert_object(message, sent)
    assert hydrating.standin.object_calls(f"/responses/{object_id}") == 4
    assert sample(worker, "webhook_bridge_hydrate_retries_total", reason="server_error") == 3
    await until_counted(worker, "response.completed", "published", 1)


async def test_a_timed_out_call_is_retried(hydrating: Hydrating) -> None:
    worker = await hydrating.start_worker(hydrating.settings(hydrate_api_timeout=0.3))
    object_id = object_id_for("fine_tuning.job.succeeded")
    hydrating.standin.delays[f"/v1/fine_tuning/jobs/{object_id}"] = [5.0]
    hydrating.store(
        "fine_tuning.job.succeeded",
        object_id,
        object_bytes("fine_tuning.job.succeeded", object_id),
    )
    sent = await hydrating.publish_event("fine_tuning.job.succeeded", object_id=object_id)
    [message] = await hydrating.take(hydrating.objects_queue, 1)
    assert_object(message, sent)
    assert sample(worker, "webhook_bridge_hydrate_retries_total", reason="timeout") == 1
    assert sample(worker, "webhook_bridge_hydrate_api_seconds_count", status="0") == 1


async def test_an_api_that_keeps_failing_hands_the_event_back_then_records_it(
    hydrating: Hydrating,
) -> None:
    settings = hydrating.settings(hydrate_attempts=2, hydrate_requeues=1)
    worker = await hydrating.start_worker(settings)
    object_id = object_id_for("batch.failed")
    hydrating.standin.failures[f"/v1/batches/{object_id}"] = [500] * 4
    sent = await hydrating.publish_event("batch.failed", object_id=object_id)
    [record] = await hydrating.take(settings.names.failed, 1)
    assert record.body == sent.body
    assert record.headers[FAILURE_HEADER] == "server_error"
    assert hydrating.standin.object_calls(f"/batches/{object_id}") == 4
    await until_counted(worker, "batch.failed", "requeued", 1)
    assert await hydrating.depth(hydrating.objects_queue) == 0


async def test_a_missing_object_is_recorded_on_the_failed_exchange(hydrating: Hydrating) -> None:
    settings = hydrating.settings()
    await hydrating.start_worker(settings)
    sent = await hydrating.publish_event("batch.completed")  # nothing stored: 404
    forbidden_id = object_id_for("response.failed")
    hydrating.standin.failures[f"/v1/responses/{forbidden_id}"] = [403]
    forbidden = await hydrating.publish_event("response.failed", object_id=forbidden_id)
    records = {
        record.message_id: record for record in await hydrating.take(settings.names.failed, 2)
    }
    for each, reason, status in ((sent, "not_found", 404), (forbidden, "forbidden", 403)):
        record = records[each.webhook_id]
        assert record.body == each.body
        # A quorum queue counts deliveries in a header of its own.
        headers = {
            name: value for name, value in record.headers.items() if name != "x-delivery-count"
        }
        assert headers == {
            **each.headers,
            FAILURE_HEADER: reason,
            "x-hydrate-status": status,
        }
        assert record.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert await hydrating.depth(hydrating.objects_queue) == 0
    assert await hydrating.depth(settings.names.queue) == 0


async def test_each_sources_events_are_fetched_with_its_projects_key(
    hydrating: Hydrating, tmp_path: Path
) -> None:
    staging_key = "sk-staging-" + secrets.token_hex(8)
    hydrating.standin.other_api_keys.add(staging_key)
    (tmp_path / "staging").mkdir()
    (tmp_path / "staging" / "OPENAI_API_KEY").write_text(staging_key + "\n")
    settings = hydrating.settings(openai_api_key="", sources="prod,staging")
    settings.load_source_keys(tmp_path, {"OPENAI_API_KEY_PROD": hydrating.standin.api_key})
    await hydrating.start_worker(settings)
    prod = await hydrating.publish_hydratable("batch.completed", source="prod")
    staging = await hydrating.publish_hydratable("batch.completed", source="staging")
    unknown = await hydrating.publish_hydratable("batch.completed", source="research")
    sourceless = await hydrating.publish_hydratable("batch.completed")

    objects = {
        message.message_id: message for message in await hydrating.take(hydrating.objects_queue, 2)
    }
    assert set(objects) == {prod.webhook_id, staging.webhook_id}
    assert objects[staging.webhook_id].headers[SOURCE_HEADER] == "staging"
    keys_by_path = {
        path: headers["Authorization"] for _, path, headers in hydrating.standin.requests
    }
    assert keys_by_path[f"/v1/batches/{prod.object_id}"] == f"Bearer {hydrating.standin.api_key}"
    assert keys_by_path[f"/v1/batches/{staging.object_id}"] == f"Bearer {staging_key}"
    records = {
        record.message_id: record for record in await hydrating.take(settings.names.failed, 2)
    }
    assert set(records) == {unknown.webhook_id, sourceless.webhook_id}
    assert {record.headers[FAILURE_HEADER] for record in records.values()} == {"unknown_source"}
    assert f"/v1/batches/{unknown.object_id}" not in keys_by_path


def test_a_source_without_an_api_key_stops_the_worker_with_one_line(tmp_path: Path) -> None:
    settings = HydrateSettings(sources="prod,staging", hydrate_metrics_port=0)
    with pytest.raises(SettingsError) as refused:
        settings.load_source_keys(tmp_path, {"OPENAI_API_KEY_PROD": "sk-prod"})
    message = str(refused.value)
    assert "staging" in message
    assert "OPENAI_API_KEY_STAGING" in message
    assert "\n" not in message
    assert "sk-prod" not in message


def test_without_sources_the_worker_needs_openai_api_key() -> None:
    with pytest.raises(ValidationError, match="OPENAI_API_KEY is required"):
        HydrateSettings(hydrate_metrics_port=0)


async def test_a_stale_object_is_fetched_again_until_it_agrees(hydrating: Hydrating) -> None:
    worker = await hydrating.start_worker()
    object_id = object_id_for("batch.completed")
    stale = object_bytes("batch.completed", object_id).replace(b'"completed"', b'"finalizing"')
    hydrating.store(
        "batch.completed", object_id, stale, stale, object_bytes("batch.completed", object_id)
    )
    sent = await hydrating.publish_event("batch.completed", object_id=object_id)
    [message] = await hydrating.take(hydrating.objects_queue, 1)
    assert_object(message, sent)
    assert sample(worker, "webhook_bridge_hydrate_retries_total", reason="stale") == 2


async def test_an_object_that_stays_stale_is_published_marked(hydrating: Hydrating) -> None:
    worker = await hydrating.start_worker(hydrating.settings(hydrate_stale_attempts=2))
    object_id = object_id_for("response.completed")
    stale = object_bytes("response.completed", object_id).replace(b'"completed"', b'"in_progress"')
    hydrating.store("response.completed", object_id, stale)
    sent = await hydrating.publish_event("response.completed", object_id=object_id)
    [message] = await hydrating.take(hydrating.objects_queue, 1)
    assert message.body == stale
    assert message.headers[STALE_HEADER] is True
    assert message.message_id == sent.webhook_id
    assert hydrating.standin.object_calls(f"/responses/{object_id}") == 3
    await until_counted(worker, "response.completed", "stale", 1)


async def test_a_refused_key_stops_fetching_and_keeps_the_events_queued(
    hydrating: Hydrating, caplog: pytest.LogCaptureFixture
) -> None:
    right_key = hydrating.standin.api_key
    hydrating.standin.api_key = "sk-not-this-one-" + uuid.uuid4().hex
    settings = hydrating.settings(openai_api_key=right_key, hydrate_auth_retry=0.3)
    worker = await hydrating.start_worker(settings)
    client = TestClient(TestServer(operations_app(worker)))
    await client.start_server()
    try:
        with caplog.at_level(logging.INFO, logger="bridge.hydrate.worker"):
            sent = [await hydrating.publish_hydratable("batch.completed") for _ in range(3)]
            await until(lambda: not worker.ready, "the worker stops")
            readiness = await client.get("/readyz")
            assert readiness.status == 503
            assert "refuses the key" in await readiness.text()
            metrics = await (await client.get("/metrics")).text()
            assert "webhook_bridge_hydrate_key_refused 1.0" in metrics
            # Several tries of the key go by, and nothing is published or recorded.
            await until(lambda: len(hydrating.standin.requests) >= 6, "the key is tried again")
            assert await hydrating.depth(hydrating.objects_queue) == 0
            assert await hydrating.depth(settings.names.failed) == 0
            refusals = [r for r in caplog.records if "refuses the key" in r.getMessage()]
            assert len(refusals) == 1
            assert right_key not in caplog.text
            # The key works again: the events queued meanwhile are hydrated.
            hydrating.standin.api_key = right_key
            messages = await hydrating.take(hydrating.objects_queue, 3)
            assert worker.ready
            assert one_per_webhook_id(messages) == Counter(each.webhook_id for each in sent)
    finally:
        await client.close()


async def test_a_refused_key_leaves_the_events_in_the_queue_when_the_worker_stops(
    hydrating: Hydrating,
) -> None:
    right_key = hydrating.standin.api_key
    hydrating.standin.api_key = "sk-not-this-one-" + uuid.uuid4().hex
    settings = hydrating.settings(openai_api_key=right_key)
    worker = await hydrating.start_worker(settings)
    for _ in range(3):
        await hydrating.publish_hydratable("video.completed")
    await until(lambda: not worker.ready, "the worker stops")
    await hydrating.stop_workers()
    assert await hydrating.depth(settings.names.queue) == 3
    assert await hydrating.depth(hydrating.objects_queue) == 0


async def test_a_redelivered_event_is_not_published_twice(hydrating: Hydrating) -> None:
    await hydrating.start_worker()
    first = await hydrating.publish_hydratable("agent.session.idle")
    for _ in range(2):
        await hydrating.publish_event(
            first.event_type,
            object_id=first.object_id,
            webhook_id=first.webhook_id,
            body=first.body,
        )
    [message] = await hydrating.take(hydrating.objects_queue, 1)
    assert_object(message, first)
    names = hydrating.settings().names
    queues = [names.queue, retry_queue_name(names.queue, 1000)]

    async def drained() -> bool:
        depths = [
            await hydrating.depth(queue) for queue in queues if await exists(hydrating, queue)
        ]
        return not any(depths)

    await until_async(drained, "both copies were handled")
    await hydrating.stop_workers()
    assert await hydrating.depth(hydrating.objects_queue) == 0


async def exists(hydrating: Hydrating, queue: str) -> bool:
    try:
        await hydrating.depth(queue)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return False
    return True


async def until_drained(hydrating: Hydrating, names: HydrationNames, what: str) -> None:
    """Until the hydration queue and its retry queue, where declared, are empty."""
    queues = [names.queue, retry_queue_name(names.queue, 1000)]

    async def drained() -> bool:
        return not any(
            [await hydrating.depth(queue) for queue in queues if await exists(hydrating, queue)]
        )

    await until_async(drained, what)


@pytest.mark.redis
async def test_two_workers_share_the_queue_and_publish_each_object_once(
    hydrating: Hydrating,
) -> None:
    namespace = unique_name("test-hydrate")
    stores = [RedisIdempotencyStore(REDIS_URL, namespace=namespace) for _ in range(2)]
    try:
        settings = hydrating.settings(hydrate_concurrency=2)
        workers = [await hydrating.start_worker(settings, idempotency=store) for store in stores]
        sent = [await hydrating.publish_hydratable("batch.completed") for _ in range(20)]
        for each in sent[:5]:  # copies, as a bridge without a shared store may publish
            await hydrating.publish_event(
                each.event_type,
                object_id=each.object_id,
                webhook_id=each.webhook_id,
                body=each.body,
            )
        messages = await hydrating.take(hydrating.objects_queue, 20)
        for message in messages:
            assert_object(message, next(s for s in sent if s.webhook_id == message.message_id))
        assert one_per_webhook_id(messages) == Counter(each.webhook_id for each in sent)
        await until_drained(hydrating, settings.names, "every copy was handled")
        handled = [
            sample(
                worker,
                "webhook_bridge_hydrations_total",
                event_type="batch.completed",
                result="published",
            )
            for worker in workers
        ]
        assert sum(handled) == 20
        await hydrating.stop_workers()
        assert await hydrating.depth(hydrating.objects_queue) == 0
    finally:
        for store in stores:
            await store.close()


@pytest.mark.redis
async def test_a_worker_killed_mid_way_loses_nothing_and_publishes_nothing_twice(
    hydrating: Hydrating, redis_client: Any
) -> None:
    """A real worker process, SIGKILLed while it waits for the API, then started again."""
    namespace_key = f"webhook-consumer:{hydrating.exchange}.hydrate:"
    settings = hydrating.settings()
    environment = {
        **{
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("BRIDGE_", "OPENAI_"))
        },
        "BRIDGE_AMQP_URL": AMQP_URL,
        "BRIDGE_EXCHANGE": hydrating.exchange,
        "OPENAI_API_KEY": hydrating.standin.api_key,
        "OPENAI_BASE_URL": hydrating.base_url,
        "BRIDGE_HYDRATE_RATE": "1000",
        "BRIDGE_HYDRATE_CONCURRENCY": "4",
        "BRIDGE_HYDRATE_IDEMPOTENCY_URL": REDIS_URL,
        "BRIDGE_HYDRATE_CLAIM_TTL": "2",
        "BRIDGE_HYDRATE_METRICS_PORT": str(free_port()),
        "BRIDGE_LOG_FORMAT": "json",
    }
    sent = [await hydrating.publish_hydratable("batch.completed") for _ in range(12)]
    # The last four answer only after a long wait the first time: the worker is killed
    # holding them, after the first eight were published.
    for each in sent[8:]:
        hydrating.standin.delays[f"/v1/batches/{each.object_id}"] = [60.0]

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "bridge", "hydrate"],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    first = start()
    try:
        early = await hydrating.take(hydrating.objects_queue, 8)
        await until(
            lambda: all(
                hydrating.standin.object_calls(f"/batches/{each.object_id}") for each in sent[8:]
            ),
            "the worker waits for the last objects",
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    second = start()
    try:
        late = await hydrating.take(hydrating.objects_queue, 4)
        await until_drained(hydrating, settings.names, "every event was handled")
    finally:
        second.send_signal(signal.SIGTERM)
        _, errors = second.communicate(timeout=60)
        await delete_prefixed(redis_client, namespace_key)
    assert second.returncode == 0, errors.decode()
    messages = early + late
    assert one_per_webhook_id(messages) == Counter(each.webhook_id for each in sent)
    for message in messages:
        assert_object(message, next(s for s in sent if s.webhook_id == message.message_id))
    assert await hydrating.depth(hydrating.objects_queue) == 0


async def until_counted(
    worker: HydrationWorker, event_type: str, result: str, expected: float
) -> None:
    """A hydration's result is counted once the broker's confirm is back, which can be just
    after its message is readable from the queue."""
    await until(
        lambda: (
            sample(worker, "webhook_bridge_hydrations_total", event_type=event_type, result=result)
            == expected
        ),
        f"{expected:g} {result} hydration(s) of {event_type} counted",
    )


def sample(worker: HydrationWorker, name: str, **labels: str) -> float:
    value = worker.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_the_fetcher_is_the_sdks() -> None:
    settings = HydrateSettings(openai_api_key="sk-test", hydrate_metrics_port=0)
    assert isinstance(openai_fetcher(settings), OpenAIFetcher)


def test_hydration_covers_each_family_once() -> None:
    assert {hydration.family for hydration in HYDRATIONS} == set(OBJECT_TYPES)
    assert hydration_for("eval.run.succeeded") is None
    assert hydration_for("realtime.call.incoming") is None
    assert hydration_for("safety_identifier.blocked") is None
    assert hydration_for("batch.completed.extra") is None
    assert isinstance(hydration_for("video.completed"), Hydration)


async def test_the_consumer_library_yields_each_object_as_the_sdks_type(
    hydrating: Hydrating, tmp_path: Path
) -> None:
    settings = hydrating.settings(sources="main")
    settings.load_source_keys(tmp_path, {"OPENAI_API_KEY_MAIN": hydrating.standin.api_key})
    await hydrating.start_worker(settings)
    consumer = ObjectConsumer(AMQP_URL, exchange=hydrating.exchange, patterns=["batch.*"])
    async with consumer:
        await hydrating.publish_hydratable("response.completed")  # not bound: not read here
        sent = await hydrating.publish_hydratable("batch.completed", source="main")
        delivery = await asyncio.wait_for(anext(aiter(consumer)), WAIT)
        assert isinstance(delivery.object, openai.types.Batch)
        assert (delivery.object.id, delivery.object.status) == (sent.object_id, "completed")
        assert delivery.body == object_bytes("batch.completed", sent.object_id)
        assert (delivery.message_id, delivery.event_type, delivery.routing_key) == (
            sent.webhook_id,
            "batch.completed",
            "batch.completed",
        )
        assert delivery.event_id == json.loads(sent.body)["id"]
        assert (delivery.object_type, delivery.source, delivery.stale) == ("batch", "main", False)
        await delivery.ack()


async def test_consume_objects_prints_each_objects_exact_bytes(hydrating: Hydrating) -> None:
    await hydrating.start_worker()
    environment = {
        **{name: value for name, value in os.environ.items() if not name.startswith("BRIDGE_")},
        "BRIDGE_AMQP_URL": AMQP_URL,
        "BRIDGE_EXCHANGE": hydrating.exchange,
    }
    printing = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "consume",
        "--objects",
        "safety.*",
        "--count",
        "1",
        "--json",
        cwd=ROOT,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert printing.stderr is not None
    started = await asyncio.wait_for(printing.stderr.readline(), WAIT)
    assert b"consuming from" in started
    sent = await hydrating.publish_hydratable("safety.warning_issued")
    out, errors = await asyncio.wait_for(printing.communicate(), WAIT)
    assert printing.returncode == 0, errors.decode()
    expected = object_bytes(sent.event_type, sent.object_id).replace(b"\n", b" ")
    assert out == expected + b"\n"


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after": "Thu, 03 Dec 2026 14:00:30 GMT"}, 30.0),
        ({"retry-after": "Thu, 03 Dec 2026 13:00:00 GMT"}, 0.0),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_is_read_in_every_form_the_api_uses(
    headers: dict[str, str], seconds: float | None
) -> None:
    now = datetime(2026, 12, 3, 14, 0, tzinfo=UTC).timestamp()
    assert retry_after_seconds(headers, clock=lambda: now) == seconds


async def test_checking_a_topology_that_is_missing_stops_with_one_line(
    hydrating: Hydrating, caplog: pytest.LogCaptureFixture
) -> None:
    settings = hydrating.settings(exchange=unique_name("test.elsewhere"), declare_topology=False)
    async with hydrating.connection.channel() as channel:
        await channel.declare_exchange(settings.exchange, ExchangeType.TOPIC, durable=True)
    try:
        code = await serve_worker(settings, openai_fetcher(settings))
    finally:
        async with hydrating.connection.channel() as channel:
            await channel.exchange_delete(settings.exchange)
    assert code == 1
    [line] = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert line.getMessage() == (
        f"hydration stopped: exchange '{settings.names.objects}' does not exist and "
        "BRIDGE_DECLARE_TOPOLOGY is false; load the broker definitions or enable declaration"
    )
