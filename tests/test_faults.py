"""Breaking things on purpose: the bridge must never answer 2xx for an event it could lose.

Each test drives a real ``webhook-bridge serve`` process with a sender that behaves like
OpenAI (retries every non-2xx and connection error) and then checks its history
(tests/history.py): every ``webhook-id`` that got a 2xx is in a durable queue bound to the
exchange, no status other than 2xx and 503 was sent, and the bridge recovered without
being restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from bridge.samples import new_webhook_id, sample_body
from tests.conftest import BridgeProcess, Broker, Signer
from tests.history import OpenAILikeSender, check
from tests.rabbitmq import (
    BrokerUser,
    app_stopped,
    close_connections_of,
    disk_alarm,
    memory_alarm,
    needs_rabbitmqctl,
    temporary_user,
)

pytestmark = [pytest.mark.broker, pytest.mark.disruptive, needs_rabbitmqctl]

PUBLISH_TIMEOUT = 2.0


@dataclass
class UnderLoad:
    bridge: BridgeProcess
    queue: str
    sender: OpenAILikeSender


@pytest.fixture
def start_under_load(
    start_bridge: Callable[..., BridgeProcess],
    broker: Broker,
    signer: Signer,
    make_sender: Callable[..., OpenAILikeSender],
) -> Callable[..., Awaitable[UnderLoad]]:
    """A ready bridge with a queue bound to ``#`` and a sender that already got 2xx's."""

    async def start(
        *, accepted: int = 50, sender_options: dict[str, Any] | None = None, **environment: str
    ) -> UnderLoad:
        bridge = start_bridge(**environment)
        await bridge.wait_ready()
        queue = await broker.bind_queue(bridge.exchange, "#")
        sender = make_sender(bridge.url, signer, **(sender_options or {}))
        sender.start()
        await sender.wait_accepted(accepted)
        return UnderLoad(bridge, queue, sender)

    return start


async def queued_ids(broker: Broker, queue: str, bridge: BridgeProcess) -> list[str]:
    """The ids in ``queue`` and in the bridge's unrouted queue: an event published while
    the broker was still restoring bindings is kept there, which is not a loss."""
    ids = []
    for name in (queue, f"{bridge.exchange}.unrouted"):
        ids += [message.message_id or "" for message in await broker.drain(name)]
    return ids


async def get_status(url: str) -> tuple[int, float, dict[str, str]]:
    started = time.monotonic()
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, time.monotonic() - started, dict(response.headers)


async def post_one(bridge: BridgeProcess, signer: Signer) -> tuple[int, float, dict[str, str]]:
    body = sample_body("batch.completed")
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as session,
        session.post(bridge.url, data=body, headers=signer.headers(body)) as response,
    ):
        return response.status, time.monotonic() - started, dict(response.headers)


def readyz(bridge: BridgeProcess) -> str:
    return f"http://127.0.0.1:{bridge.port}/readyz"


async def test_broker_restart_under_load(
    start_under_load: Callable[..., Awaitable[UnderLoad]],
    broker: Broker,
    signer: Signer,
    scenario: str,
) -> None:
    loaded = await start_under_load(BRIDGE_PUBLISH_TIMEOUT=str(PUBLISH_TIMEOUT))
    bridge, queue, sender = loaded.bridge, loaded.queue, loaded.sender

    with app_stopped():
        status, elapsed, headers = await post_one(bridge, signer)
        assert status == 503
        assert "Retry-After" in headers
        assert elapsed < PUBLISH_TIMEOUT + 1, "503 came after a hang"
        assert (await get_status(readyz(bridge)))[0] == 503
        await asyncio.sleep(1)

    await bridge.wait_ready(timeout=30)
    await sender.accept_more(50)
    history = await sender.finish()
    verdict = check(scenario, history, await queued_ids(broker, queue, bridge))
    assert verdict.unavailable > 0, "the outage was seen"
    assert bridge.process.poll() is None, "recovered without a restart"


@pytest.fixture
def broker_user() -> Iterator[BrokerUser]:
    with temporary_user() as user:
        yield user


async def test_connections_killed_under_load(
    broker_user: BrokerUser,
    start_under_load: Callable[..., Awaitable[UnderLoad]],
    broker: Broker,
    scenario: str,
) -> None:
    loaded = await start_under_load(
        BRIDGE_PUBLISH_TIMEOUT=str(PUBLISH_TIMEOUT), BRIDGE_AMQP_URL=broker_user.amqp_url
    )
    bridge, queue, sender = loaded.bridge, loaded.queue, loaded.sender

    for _ in range(3):
        assert close_connections_of(broker_user.name) >= 1
        await asyncio.sleep(0.5)
    await bridge.wait_ready(timeout=30)
    await sender.accept_more(50)
    history = await sender.finish()
    check(scenario, history, await queued_ids(broker, queue, bridge))


@pytest.mark.parametrize("alarm", [memory_alarm, disk_alarm], ids=["memory", "disk"])
async def test_an_alarm_blocks_publishes_and_503s_within_the_deadline(
    alarm: Callable[[], contextlib.AbstractContextManager[None]],
    start_bridge: Callable[..., BridgeProcess],
    broker: Broker,
    signer: Signer,
    make_sender: Callable[..., OpenAILikeSender],
    scenario: str,
) -> None:
    bridge = start_bridge(BRIDGE_PUBLISH_TIMEOUT=str(PUBLISH_TIMEOUT))
    await bridge.wait_ready()
    queue = await broker.bind_queue(bridge.exchange, "#")
    sender = make_sender(bridge.url, signer, concurrency=4)

    with alarm():
        await asyncio.sleep(0.5)
        first_status, first_elapsed, _ = await post_one(bridge, signer)
        assert first_status == 503
        assert first_elapsed < PUBLISH_TIMEOUT + 1, "nothing hangs past the publish deadline"
        assert (await get_status(readyz(bridge)))[0] == 503, "the blocked state shows in /readyz"
        status, elapsed, headers = await post_one(bridge, signer)
        assert status == 503
        assert headers["Retry-After"]
        assert elapsed < 1, "while blocked, the bridge answers at once"
        sender.start()
        await asyncio.sleep(1)

    await bridge.wait_ready(timeout=30)
    await sender.wait_accepted(30)
    history = await sender.finish()
    verdict = check(scenario, history, await queued_ids(broker, queue, bridge))
    assert verdict.unavailable > 0


async def test_sigterm_under_load_drains_and_exits_zero(
    start_under_load: Callable[..., Awaitable[UnderLoad]], broker: Broker, scenario: str
) -> None:
    loaded = await start_under_load(
        accepted=100,
        sender_options={"concurrency": 32, "retry_deadline": 5},
        BRIDGE_DRAIN_TIMEOUT="10",
    )
    bridge, queue, sender = loaded.bridge, loaded.queue, loaded.sender

    started = time.monotonic()
    bridge.process.send_signal(signal.SIGTERM)
    exit_code = await asyncio.to_thread(bridge.process.wait, 20)
    assert exit_code == 0
    assert time.monotonic() - started < 10 + 2, "exited within the drain deadline"
    history = await sender.finish(abandon=True)
    check(scenario, history, await queued_ids(broker, queue, bridge), abandoned=True)
    log = bridge.log_path.read_text()
    assert "shutting down" in log
    assert "Traceback" not in log


async def test_sigkill_loses_nothing_that_got_a_2xx(
    start_under_load: Callable[..., Awaitable[UnderLoad]], broker: Broker, scenario: str
) -> None:
    loaded = await start_under_load(
        accepted=100, sender_options={"concurrency": 32, "retry_deadline": 5}
    )
    bridge, queue, sender = loaded.bridge, loaded.queue, loaded.sender

    bridge.process.kill()
    bridge.process.wait(timeout=10)
    history = await sender.finish(abandon=True)
    check(scenario, history, await queued_ids(broker, queue, bridge), abandoned=True)


async def test_a_hundred_concurrent_copies_publish_once_and_a_later_retry_not_at_all(
    start_bridge: Callable[..., BridgeProcess], broker: Broker, signer: Signer
) -> None:
    bridge = start_bridge()
    await bridge.wait_ready()
    queue = await broker.bind_queue(bridge.exchange, "#")
    webhook_id = new_webhook_id()
    body = sample_body("fine_tuning.job.succeeded")
    headers = signer.headers(body, webhook_id=webhook_id)

    async def post(session: aiohttp.ClientSession) -> tuple[int, str]:
        async with session.post(bridge.url, data=body, headers=headers) as response:
            return response.status, (await response.json())["outcome"]

    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        answers = await asyncio.gather(*(post(session) for _ in range(100)))
        assert time.monotonic() - started < 10, "all answered promptly"
        await asyncio.sleep(0.5)
        retry_headers = signer.headers(body, webhook_id=webhook_id)
        async with session.post(bridge.url, data=body, headers=retry_headers) as response:
            retry = response.status, (await response.json())["outcome"]

    assert sorted(answers) == [(200, "duplicate")] * 99 + [(200, "published")]
    assert retry == (200, "duplicate")
    assert await queued_ids(broker, queue, bridge) == [webhook_id]
