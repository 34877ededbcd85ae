"""Replicas of one consuming service sharing a Redis idempotency store: each event handled once."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from bridge.consumer import WebhookEvent, retry_queue_name
from bridge.dedup import ClaimState
from bridge.dedup.idempotency import RedisIdempotencyStore
from bridge.samples import sample_body
from tests.conftest import Broker, Signer, unique_name
from tests.redis_support import (
    REDIS_URL,
    delete_prefixed,
    redis_client,
    remembering_hashes,
    remembers,
)
from tests.test_consumer import (
    consumer_for,
    exchange,
    publish_like_bridge,
    ready_count,
    running,
    settle_time,
    wait_until,
)

__all__ = ["exchange", "redis_client"]  # fixtures used by the tests below

pytestmark = pytest.mark.redis


@pytest.fixture
async def namespace(redis_client: Redis) -> AsyncIterator[str]:
    name = unique_name("test-service")
    try:
        yield name
    finally:
        await delete_prefixed(redis_client, f"webhook-consumer:{name}:")


@contextlib.asynccontextmanager
async def redis_store(namespace: str, **options: float) -> AsyncIterator[RedisIdempotencyStore]:
    store = RedisIdempotencyStore(REDIS_URL, namespace=namespace, **options)
    try:
        yield store
    finally:
        await store.close()


async def test_claim_done_and_release_against_redis(namespace: str, redis_client: Redis) -> None:
    async with redis_store(namespace) as one, redis_store(namespace) as other:
        assert await one.claim("wh_1") is ClaimState.NEW
        assert await other.claim("wh_1") is ClaimState.IN_FLIGHT
        await one.release("wh_1")
        assert await other.claim("wh_1") is ClaimState.NEW
        await other.done("wh_1")
        assert await one.claim("wh_1") is ClaimState.CONFIRMED
        prefix = f"webhook-consumer:{namespace}:"
        assert await remembers(redis_client, prefix, "wh_1")
        [hash_name] = await remembering_hashes(redis_client, prefix)
        window_ms = 73 * 3600 * 1000
        assert window_ms < await redis_client.pttl(hash_name) <= window_ms * 5 / 4


def test_a_namespace_is_required() -> None:
    with pytest.raises(ValueError, match="namespace"):
        RedisIdempotencyStore(REDIS_URL, namespace="")


@pytest.mark.broker
async def test_two_replicas_handle_each_repeated_message_once(
    broker: Broker, exchange: str, signer: Signer, namespace: str
) -> None:
    queue = unique_name("test.queue")
    broker.created_queues.append(retry_queue_name(queue, 300))  # where busy copies wait
    handled: Counter[str] = Counter()

    async def slow_handler(event: WebhookEvent) -> None:
        handled[event.id] += 1
        await asyncio.sleep(0.2)  # long enough for the other replica to get the copy meanwhile

    bodies = [sample_body("batch.completed") for _ in range(6)]
    async with (
        redis_store(namespace) as first_store,
        redis_store(namespace) as second_store,
        consumer_for(
            broker, exchange, queue=queue, prefetch=4, idempotency=first_store,
            busy_retry_seconds=0.3,
        ) as first,
        consumer_for(
            broker, exchange, queue=queue, prefetch=4, idempotency=second_store,
            busy_retry_seconds=0.3,
        ) as second,
    ):  # fmt: skip
        for body in bodies:
            headers = signer.headers(body)
            for _ in range(3):  # three copies of each, as from a bridge without shared dedup
                await publish_like_bridge(broker, exchange, body, headers)
        async with running(first, slow_handler), running(second, slow_handler):
            await wait_until(lambda: len(handled) == len(bodies), timeout=15)
            await wait_until(lambda: handled.total() == len(bodies), timeout=5)
            for _ in range(40):
                if await ready_count(broker, queue) == 0:
                    break
                await asyncio.sleep(0.25)
            await settle_time()
            assert await ready_count(broker, queue) == 0, "every copy was settled"
    assert set(handled.values()) == {1}


@pytest.mark.broker
async def test_a_failed_handler_releases_the_claim_so_a_copy_is_handled(
    broker: Broker, exchange: str, signer: Signer, namespace: str
) -> None:
    queue = unique_name("test.queue")
    attempts: list[str] = []

    async def fails_first_time(event: WebhookEvent) -> None:
        attempts.append(event.id)
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")

    body = sample_body("response.completed")
    headers = signer.headers(body)
    async with (
        redis_store(namespace) as store,
        consumer_for(broker, exchange, queue=queue, idempotency=store) as consumer,
    ):
        await publish_like_bridge(broker, exchange, body, headers)
        await publish_like_bridge(broker, exchange, body, headers)
        async with running(consumer, fails_first_time):
            await wait_until(lambda: len(attempts) == 2)
            await settle_time()
        assert await store.claim(headers["webhook-id"]) is ClaimState.CONFIRMED
    assert len(attempts) == 2
