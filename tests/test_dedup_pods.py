"""Two ``webhook-bridge serve`` processes ("pods") sharing one Redis: each id published once.

Every test counts what reached a queue bound to the shared exchange, per ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable

import aiohttp
import pytest
from redis.asyncio import Redis
from yarl import URL

from bridge.samples import new_webhook_id, sample_body
from tests.conftest import AMQP_URL, BridgeProcess, Broker, Signer, unique_name
from tests.redis_support import REDIS_URL, in_flight_key, redis_client, redis_prefix
from tests.tcp_proxy import holdable_proxy

__all__ = ["redis_client", "redis_prefix"]  # fixtures used by the tests below

pytestmark = [pytest.mark.broker, pytest.mark.redis]

PUBLISH_TIMEOUT = 2.0
CLAIM_TTL = 2 * PUBLISH_TIMEOUT + 1


def start_pod(
    start_bridge: Callable[..., BridgeProcess], exchange: str, prefix: str, **extra: str
) -> BridgeProcess:
    return start_bridge(
        exchange,
        BRIDGE_DEDUP_URL=REDIS_URL,
        BRIDGE_DEDUP_KEY_PREFIX=prefix,
        BRIDGE_PUBLISH_TIMEOUT=str(PUBLISH_TIMEOUT),
        **extra,
    )


async def ready_pods(
    start_bridge: Callable[..., BridgeProcess], broker: Broker, prefix: str, count: int
) -> tuple[list[BridgeProcess], str]:
    """``count`` ready pods on one new exchange, and a queue bound to it with ``#``."""
    exchange = unique_name("test.webhooks")
    pods = [start_pod(start_bridge, exchange, prefix) for _ in range(count)]
    for pod in pods:
        await pod.wait_ready()
    return pods, await broker.bind_queue(exchange, "#")


async def answer(
    session: aiohttp.ClientSession, pod: BridgeProcess, signer: Signer, webhook_id: str, body: bytes
) -> tuple[int, str]:
    headers = signer.headers(body, webhook_id=webhook_id)
    async with session.post(pod.url, data=body, headers=headers) as response:
        payload = await response.json()
        return response.status, payload.get("outcome") or payload.get("error", "")


async def retry_until_2xx(
    session: aiohttp.ClientSession,
    pod: BridgeProcess,
    signer: Signer,
    webhook_id: str,
    body: bytes,
    deadline: float = 30.0,
) -> list[tuple[int, str]]:
    """Every answer to one copy, retried like OpenAI does until a 2xx."""
    answers = []
    give_up = time.monotonic() + deadline
    while time.monotonic() < give_up:
        answers.append(await answer(session, pod, signer, webhook_id, body))
        if answers[-1][0] == 200:
            break
        await asyncio.sleep(0.2)
    return answers


async def ids_in(broker: Broker, queue: str) -> Counter[str]:
    return Counter(message.message_id or "" for message in await broker.drain(queue))


async def test_concurrent_copies_at_two_pods_publish_each_id_once(
    start_bridge: Callable[..., BridgeProcess],
    broker: Broker,
    signer: Signer,
    redis_prefix: str,
) -> None:
    pods, queue = await ready_pods(start_bridge, broker, redis_prefix, 2)
    bodies = {new_webhook_id(): sample_body("batch.completed") for _ in range(30)}

    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as session:
        copies = [
            retry_until_2xx(session, pod, signer, webhook_id, body)
            for webhook_id, body in bodies.items()
            for pod in pods
            for _ in range(3)
        ]
        histories = await asyncio.gather(*copies)

    assert all(history[-1][0] == 200 for history in histories), "every copy ends in a 2xx"
    outcomes = Counter(history[-1][1] for history in histories)
    assert outcomes["published"] == len(bodies)
    assert outcomes["duplicate"] == len(bodies) * 5
    await asyncio.sleep(0.5)
    assert await ids_in(broker, queue) == Counter(dict.fromkeys(bodies, 1))


async def test_a_copy_at_the_other_pod_after_the_confirm_is_a_duplicate(
    start_bridge: Callable[..., BridgeProcess],
    broker: Broker,
    signer: Signer,
    redis_prefix: str,
) -> None:
    (first, second), queue = await ready_pods(start_bridge, broker, redis_prefix, 2)
    webhook_id, body = new_webhook_id(), sample_body("response.completed")

    async with aiohttp.ClientSession() as session:
        assert await answer(session, first, signer, webhook_id, body) == (200, "published")
        assert await answer(session, second, signer, webhook_id, body) == (200, "duplicate")
        assert await answer(session, first, signer, webhook_id, body) == (200, "duplicate")

    assert await ids_in(broker, queue) == Counter({webhook_id: 1})


async def test_a_restarted_pod_still_answers_duplicate(
    start_bridge: Callable[..., BridgeProcess],
    broker: Broker,
    signer: Signer,
    redis_prefix: str,
) -> None:
    (pod,), queue = await ready_pods(start_bridge, broker, redis_prefix, 1)
    webhook_id, body = new_webhook_id(), sample_body("batch.failed")

    async with aiohttp.ClientSession() as session:
        assert await answer(session, pod, signer, webhook_id, body) == (200, "published")
    assert pod.stop() == 0
    restarted = start_pod(start_bridge, pod.exchange, redis_prefix)
    await restarted.wait_ready()
    async with aiohttp.ClientSession() as session:
        assert await answer(session, restarted, signer, webhook_id, body) == (200, "duplicate")

    assert await ids_in(broker, queue) == Counter({webhook_id: 1})


async def test_a_pod_killed_between_claim_and_confirm_leaves_a_claim_that_expires(
    start_bridge: Callable[..., BridgeProcess],
    broker: Broker,
    signer: Signer,
    redis_client: Redis,
    redis_prefix: str,
) -> None:
    exchange = unique_name("test.webhooks")
    survivor = start_pod(start_bridge, exchange, redis_prefix)
    broker_url = URL(AMQP_URL)
    async with holdable_proxy(broker_url.host or "127.0.0.1", broker_url.port or 5672) as proxy:
        doomed = start_pod(
            start_bridge,
            exchange,
            redis_prefix,
            BRIDGE_AMQP_URL=str(broker_url.with_port(proxy.port)),
        )
        await doomed.wait_ready()
        await survivor.wait_ready()
        queue = await broker.bind_queue(exchange, "#")
        webhook_id, body = new_webhook_id(), sample_body("batch.completed")

        proxy.hold()  # the doomed pod's publish now waits for a confirm that cannot come
        async with aiohttp.ClientSession() as session:
            stuck = asyncio.create_task(answer(session, doomed, signer, webhook_id, body))
            for _ in range(100):
                held = await redis_client.get(in_flight_key(redis_prefix, webhook_id))
                if held is not None:
                    break
                await asyncio.sleep(0.01)
            assert isinstance(held, bytes)
            assert held.startswith(b"inflight:")
            claimed_at = time.monotonic()
            doomed.stop(signal.SIGKILL)
            with pytest.raises(aiohttp.ClientError):
                await stuck

            # Until the claim expires nobody may answer 2xx: the id is not in RabbitMQ.
            early = await answer(session, survivor, signer, webhook_id, body)
            assert early == (503, "unavailable")
            assert time.monotonic() - claimed_at < CLAIM_TTL

            history = await retry_until_2xx(session, survivor, signer, webhook_id, body)
            published_at = time.monotonic()

    assert history[-1] == (200, "published")
    assert all(status == 503 for status, _ in history[:-1])
    assert published_at - claimed_at >= CLAIM_TTL - 0.5
    assert await ids_in(broker, queue) == Counter({webhook_id: 1})
