"""The Redis store against the real Redis: the keys it writes, their TTLs, and failures."""

from __future__ import annotations

import asyncio
import logging
import secrets

import pytest
from redis.asyncio import Redis
from yarl import URL

from bridge.app import WEBHOOK_PATH, create_app
from bridge.dedup import ClaimState, StoreUnavailable, redis_pipeline, store_from_settings
from bridge.dedup.redis_claims import BUCKETS, digest_of
from bridge.dedup.redis_pipeline import Command, PipelinedCommands, connect, pack
from bridge.dedup.redis_store import RedisStore
from bridge.redis_url import parse_redis_url
from bridge.samples import sample_body
from tests.conftest import AiohttpClient, FakePublisher, Signer, free_port, make_settings
from tests.redis_support import (
    REDIS_URL,
    in_flight_key,
    redis_client,
    redis_prefix,
    remembering_hashes,
    remembers,
)
from tests.tcp_proxy import holdable_proxy

__all__ = ["redis_client", "redis_prefix"]  # fixtures used by the tests below

pytestmark = pytest.mark.redis


async def until_available(store: RedisStore) -> None:
    """Wait (up to three seconds) for the store's probe to find Redis answering again."""
    for _ in range(60):
        if store.available:
            return
        await asyncio.sleep(0.05)


def store_at(prefix: str, url: str = REDIS_URL, **options: float) -> RedisStore:
    timeout = options.pop("timeout", 0.2)
    return RedisStore(
        connect(parse_redis_url(url), timeout=timeout),
        prefix=prefix,
        window_seconds=options.pop("window_seconds", 3600),
        claim_ttl_seconds=options.pop("claim_ttl_seconds", 11),
        timeout=timeout,
        location=url,
        while_down="publishing without the duplicate check",
    )


async def test_claim_confirm_and_their_keys(redis_client: Redis, redis_prefix: str) -> None:
    store = store_at(redis_prefix)
    await store.start()
    try:
        claim = await store.claim("wh_1")
        assert claim.state is ClaimState.NEW
        held = await redis_client.get(in_flight_key(redis_prefix, "wh_1"))
        assert held == claim.token
        assert held is not None
        assert held.startswith(b"inflight:")
        assert 10_000 < await redis_client.pttl(in_flight_key(redis_prefix, "wh_1")) <= 11_000
        assert not await remembers(redis_client, redis_prefix, "wh_1")

        assert (await store.claim("wh_1")).state is ClaimState.IN_FLIGHT

        await store.confirm(claim)
        assert await redis_client.exists(in_flight_key(redis_prefix, "wh_1")) == 0
        assert await remembers(redis_client, redis_prefix, "wh_1")
        [hash_name] = await remembering_hashes(redis_client, redis_prefix)
        assert await redis_client.hget(hash_name, digest_of("wh_1")) == b""
        assert await redis_client.object("encoding", hash_name) == b"listpack"
        # Remembered for the window, and at most one bucket of it longer.
        window_ms = 3_600_000
        assert window_ms < await redis_client.pttl(hash_name) <= window_ms * (BUCKETS + 1) / BUCKETS
        assert (await store.claim("wh_1")).state is ClaimState.CONFIRMED
    finally:
        await store.close()


async def test_release_deletes_only_a_claim_still_ours(
    redis_client: Redis, redis_prefix: str
) -> None:
    store = store_at(redis_prefix)
    try:
        ours = await store.claim("wh_1")
        await store.release(ours)
        assert await redis_client.exists(in_flight_key(redis_prefix, "wh_1")) == 0
        assert (await store.claim("wh_1")).state is ClaimState.NEW

        expired_and_retaken = await store.claim("wh_2")
        retaken = in_flight_key(redis_prefix, "wh_2")
        await redis_client.set(retaken, b"inflight:another-pod:7", px=10_000)
        await store.release(expired_and_retaken)
        assert await redis_client.get(retaken) == b"inflight:another-pod:7"
        await store.confirm(expired_and_retaken)  # a confirm leaves another's claim alone too
        assert await redis_client.get(retaken) == b"inflight:another-pod:7"
    finally:
        await store.close()


async def test_waiting_for_another_pods_copy(redis_client: Redis, redis_prefix: str) -> None:
    here, elsewhere = store_at(redis_prefix), store_at(redis_prefix)
    try:
        theirs = await elsewhere.claim("wh_confirmed")

        async def confirm_soon() -> None:
            await asyncio.sleep(0.2)
            await elsewhere.confirm(theirs)

        confirming = asyncio.create_task(confirm_soon())
        assert await here.wait_confirmed("wh_confirmed", within=2.0)
        await confirming

        released = await elsewhere.claim("wh_released")
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, lambda: asyncio.ensure_future(elsewhere.release(released)))
        started = loop.time()
        assert not await here.wait_confirmed("wh_released", within=2.0)
        assert loop.time() - started < 1.0  # gave up as soon as the claim was dropped

        await elsewhere.claim("wh_stuck")
        started = loop.time()
        assert not await here.wait_confirmed("wh_stuck", within=0.3)
        assert 0.3 <= loop.time() - started < 1.0
    finally:
        await here.close()
        await elsewhere.close()


async def test_commands_of_one_turn_share_a_pipeline(
    redis_client: Redis, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_at(redis_prefix)
    await store.start()  # loads the scripts, so no claim is sent again whole
    pipelines: list[int] = []

    def counting_pack(commands: list[Command]) -> bytes:
        pipelines.append(len(commands))
        return pack(commands)

    monkeypatch.setattr(redis_pipeline, "pack", counting_pack)
    try:
        claims = await asyncio.gather(*(store.claim(f"wh_{n}") for n in range(200)))
        assert all(claim.state is ClaimState.NEW for claim in claims)
        assert len({claim.token for claim in claims}) == 200
        assert pipelines == [200]
        in_flight = redis_client.scan_iter(match=f"{redis_prefix}{{*}}:i:*")
        assert len([key async for key in in_flight]) == 200
    finally:
        await store.close()


async def test_an_unreachable_redis_fails_fast_and_logs_once(
    caplog: pytest.LogCaptureFixture, redis_prefix: str
) -> None:
    store = store_at(redis_prefix, url=f"redis://127.0.0.1:{free_port()}/0")
    with caplog.at_level(logging.INFO, logger="bridge.dedup"):
        await store.start()
        try:
            assert not store.available
            loop = asyncio.get_running_loop()
            started = loop.time()
            for _ in range(20):
                with pytest.raises(StoreUnavailable):
                    await store.claim("wh_1")
            assert loop.time() - started < 0.1  # the circuit is open: nothing waits
            await asyncio.sleep(1.2)  # probes keep failing, silently
        finally:
            await store.close()
    problems = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(problems) == 1
    assert "unavailable" in problems[0].getMessage()


async def test_the_store_comes_back_after_redis_answers_again(
    caplog: pytest.LogCaptureFixture, redis_prefix: str
) -> None:
    store = store_at(redis_prefix)
    await store.start()
    try:
        with caplog.at_level(logging.WARNING, logger="bridge.dedup"):
            store._went_down(StoreUnavailable("simulated"))
            assert not store.available
            await until_available(store)
        assert store.available
        assert (await store.claim("wh_1")).state is ClaimState.NEW
        assert [record.getMessage() for record in caplog.records] == [
            f"deduplication store at {REDIS_URL} unavailable (simulated): "
            "publishing without the duplicate check until it answers",
            f"deduplication store at {REDIS_URL} available again",
        ]
    finally:
        await store.close()


async def test_the_redis_password_is_never_logged(
    caplog: pytest.LogCaptureFixture, signer: Signer
) -> None:
    password = "pw-" + secrets.token_hex(8)
    settings = make_settings(
        signer, dedup_url=f"redis://bridge:{password}@127.0.0.1:{free_port()}/0"
    )
    assert password not in settings.dedup_url_redacted
    assert "***" in settings.dedup_url_redacted
    store = store_from_settings(settings)
    with caplog.at_level(logging.DEBUG):
        await store.start()
        with pytest.raises(StoreUnavailable):
            await store.claim("wh_1")
        await store.close()
    assert caplog.records
    assert all(password not in record.getMessage() for record in caplog.records)


# --- the HTTP answers, with a fake publisher ------------------------------------------


async def test_redis_down_in_reject_mode_answers_503_and_is_not_ready(
    aiohttp_client: AiohttpClient, signer: Signer, fake_publisher: FakePublisher
) -> None:
    settings = make_settings(
        signer, dedup_url=f"redis://127.0.0.1:{free_port()}/0", dedup_on_error="reject"
    )
    client = await aiohttp_client(create_app(settings, fake_publisher))
    body = sample_body("batch.completed")
    response = await client.post(WEBHOOK_PATH, data=body, headers=signer.headers(body))
    assert response.status == 503
    assert response.headers["Retry-After"] == str(settings.retry_after)
    assert (await response.json())["error"] == "unavailable"
    assert fake_publisher.published == []
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["status"] == "deduplication store unavailable"
    exposition = (await (await client.get("/metrics")).read()).decode()
    assert 'webhook_bridge_dedup_results_total{result="store_error"} 1.0' in exposition


async def test_redis_down_in_publish_mode_publishes_unchecked(
    aiohttp_client: AiohttpClient, signer: Signer, fake_publisher: FakePublisher
) -> None:
    settings = make_settings(signer, dedup_url=f"redis://127.0.0.1:{free_port()}/0")
    client = await aiohttp_client(create_app(settings, fake_publisher))
    body = sample_body("batch.completed")
    for _ in range(2):
        response = await client.post(WEBHOOK_PATH, data=body, headers=signer.headers(body))
        assert response.status == 200
        assert (await response.json())["outcome"] == "published"
    assert len(fake_publisher.published) == 2  # the cost of publishing without the check
    assert (await client.get("/readyz")).status == 200


async def test_answers_and_metrics_with_redis_up(
    aiohttp_client: AiohttpClient, signer: Signer, fake_publisher: FakePublisher, redis_prefix: str
) -> None:
    settings = make_settings(signer, dedup_url=REDIS_URL, dedup_key_prefix=redis_prefix)
    client = await aiohttp_client(create_app(settings, fake_publisher))
    body = sample_body("batch.completed")
    headers = signer.headers(body)
    outcomes = []
    for _ in range(2):
        response = await client.post(WEBHOOK_PATH, data=body, headers=headers)
        outcomes.append((response.status, (await response.json())["outcome"]))
    assert outcomes == [(200, "published"), (200, "duplicate")]
    assert len(fake_publisher.published) == 1
    exposition = (await (await client.get("/metrics")).read()).decode()
    assert 'webhook_bridge_dedup_results_total{result="new"} 1.0' in exposition
    assert 'webhook_bridge_dedup_results_total{result="duplicate"} 1.0' in exposition
    assert "webhook_bridge_dedup_store_seconds_count 3.0" in exposition  # claim, confirm, claim


async def test_an_unauthenticated_request_claims_nothing(
    aiohttp_client: AiohttpClient,
    signer: Signer,
    fake_publisher: FakePublisher,
    redis_client: Redis,
    redis_prefix: str,
) -> None:
    settings = make_settings(signer, dedup_url=REDIS_URL, dedup_key_prefix=redis_prefix)
    client = await aiohttp_client(create_app(settings, fake_publisher))
    body = sample_body("batch.completed")
    forged = Signer().headers(body)
    response = await client.post(WEBHOOK_PATH, data=body, headers=forged)
    assert response.status == 401
    assert await redis_client.exists(in_flight_key(redis_prefix, forged["webhook-id"])) == 0
    assert await remembering_hashes(redis_client, redis_prefix) == []


async def test_a_cut_connection_is_one_outage_not_a_flapping_one(
    caplog: pytest.LogCaptureFixture, redis_prefix: str
) -> None:
    redis_url = URL(REDIS_URL)
    async with holdable_proxy(redis_url.host or "127.0.0.1", redis_url.port or 6379) as proxy:
        # A cut resets the connections at once: no need for the short default deadline,
        # which a loaded machine could miss before the cut.
        store = store_at(redis_prefix, url=str(redis_url.with_port(proxy.port)), timeout=5.0)
        with caplog.at_level(logging.WARNING, logger="bridge.dedup"):
            await store.start()
            try:

                async def claim_in_turn(turn: int) -> None:
                    for _ in range(turn):
                        await asyncio.sleep(0)
                    await store.claim(f"wh_{turn}")

                # Pipelines sent in successive turns overlap, on one connection.
                await asyncio.gather(*(claim_in_turn(turn) for turn in range(8)))
                assert isinstance(store._claims.commands, PipelinedCommands)
                proxy.cut()  # what a Redis restart does to every connection
                with pytest.raises(StoreUnavailable):
                    await store.claim("wh_after_cut")
                await until_available(store)
                assert store.available
                for n in range(20):
                    assert (await store.claim(f"wh_back_{n}")).state is ClaimState.NEW
            finally:
                await store.close()
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages
    assert "unavailable" in messages[0]
    assert "available again" in messages[1]


async def test_a_mark_is_not_waited_for_and_lands_before_close(redis_prefix: str) -> None:
    store = store_at(redis_prefix)
    await store.start()
    claim = await store.claim("wh_marked")
    landed = store.confirm(claim)
    assert not landed.done()  # queued for this turn's pipeline: the caller answers at once
    await store.close()
    assert landed.done()
    another_pod = store_at(redis_prefix)
    await another_pod.start()
    try:
        assert (await another_pod.claim("wh_marked")).state is ClaimState.CONFIRMED
    finally:
        await another_pod.close()


async def test_a_redis_that_stops_answering_fails_every_waiting_command_then_is_reconnected(
    redis_prefix: str,
) -> None:
    redis_url = URL(REDIS_URL)
    async with holdable_proxy(redis_url.host or "127.0.0.1", redis_url.port or 6379) as proxy:
        store = store_at(redis_prefix, url=str(redis_url.with_port(proxy.port)), timeout=0.3)
        await store.start()
        try:
            assert (await store.claim("wh_before")).state is ClaimState.NEW
            proxy.hold()

            async def claim_in_turn(turn: int) -> BaseException | None:
                for _ in range(turn):
                    await asyncio.sleep(0)
                try:
                    await store.claim(f"wh_held_{turn}")
                except StoreUnavailable as refused:
                    return refused
                return None

            loop = asyncio.get_running_loop()
            started = loop.time()
            outcomes = await asyncio.gather(*(claim_in_turn(turn) for turn in range(5)))
            assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes)
            assert loop.time() - started < 2.0  # bounded by the timeout, not by Redis
            assert not store.available
            proxy.resume()
            await until_available(store)
            assert store.available
            assert (await store.claim("wh_after")).state is ClaimState.NEW
        finally:
            await store.close()
