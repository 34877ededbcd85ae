"""``/metrics`` counts exactly what happened, for a known mix of requests."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from bridge.app import WEBHOOK_PATH, create_app
from bridge.publisher import BrokerUnavailable
from bridge.samples import sample_body
from tests.conftest import AiohttpClient, Client, FakePublisher, Signer, make_settings, new_secret


async def scrape(client: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def requests(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], outcome: str) -> float:
    return samples[("webhook_bridge_requests_total", (("outcome", outcome),))]


async def test_counters_move_by_exactly_the_right_amounts(
    aiohttp_client: AiohttpClient, signer: Signer, fake_publisher: FakePublisher
) -> None:
    old_secret = new_secret()
    settings = make_settings(signer, webhook_secret=f"{signer.secret},{old_secret}")
    client = await aiohttp_client(create_app(settings, fake_publisher))
    old_signer = Signer(secret=old_secret)

    async def send(body: bytes, headers: dict[str, str]) -> int:
        return (await client.post(WEBHOOK_PATH, data=body, headers=headers)).status

    batch = sample_body("batch.completed")
    duplicate_headers = signer.headers(batch)
    assert await send(batch, duplicate_headers) == 200
    assert await send(batch, duplicate_headers) == 200
    for _ in range(2):
        call = sample_body("realtime.call.incoming")
        assert await send(call, old_signer.headers(call)) == 200
    assert await send(b"[]", signer.headers(b"[]")) == 200
    assert await send(batch, {}) == 400
    for _ in range(3):
        assert await send(batch, Signer().headers(batch)) == 401
    large = b" " * (settings.max_body_bytes + 1)
    assert await send(large, signer.headers(large)) == 413
    fake_publisher.error = BrokerUnavailable("down")
    failed = sample_body("batch.failed")
    assert await send(failed, signer.headers(failed)) == 503

    samples = await scrape(client)
    assert requests(samples, "published") == 3
    assert requests(samples, "duplicate") == 1
    assert requests(samples, "quarantined") == 1
    assert requests(samples, "unrouted") == 0
    assert requests(samples, "bad_request") == 1
    assert requests(samples, "unauthorized") == 3
    assert requests(samples, "too_large") == 1
    assert requests(samples, "unavailable") == 1
    published = "webhook_bridge_published_total"
    assert samples[(published, (("event_type", "batch.completed"),))] == 1
    assert samples[(published, (("event_type", "realtime.call.incoming"),))] == 2
    assert samples[("webhook_bridge_publish_seconds_count", ())] == 4
    secret_matches = "webhook_bridge_secret_matches_total"
    assert samples[(secret_matches, (("secret_index", "0"),))] == 4
    assert samples[(secret_matches, (("secret_index", "1"),))] == 2
    assert samples[("webhook_bridge_in_flight", ())] == 0
    assert samples[("webhook_bridge_broker_connected", ())] == 1


async def test_in_flight_gauge_counts_requests_waiting_for_a_confirm(
    aiohttp_client: AiohttpClient, signer: Signer, fake_publisher: FakePublisher
) -> None:
    client = await aiohttp_client(create_app(make_settings(signer), fake_publisher))
    fake_publisher.delay = 0.5
    bodies = [sample_body("response.completed") for _ in range(3)]
    pending = [
        asyncio.create_task(client.post(WEBHOOK_PATH, data=body, headers=signer.headers(body)))
        for body in bodies
    ]
    await asyncio.sleep(0.2)
    assert (await scrape(client))[("webhook_bridge_in_flight", ())] == 3
    await asyncio.gather(*pending)
    assert (await scrape(client))[("webhook_bridge_in_flight", ())] == 0
    fake_publisher.connected = False
    assert (await scrape(client))[("webhook_bridge_broker_connected", ())] == 0
