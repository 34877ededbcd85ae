"""The compact layout in a Redis of the tests' own: memory per id, shards, the previous layout."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from bridge.dedup import ClaimState
from bridge.dedup.redis_claims import GROUPS, RedisClaims, digest_of, group_of
from bridge.dedup.redis_pipeline import connect
from bridge.redis_url import parse_redis_url
from tests.redis_support import PrivateRedis, redis_port, remembering_hashes

pytestmark = pytest.mark.redis

PREFIX = "webhook-bridge:test.webhooks:"
WINDOW_SECONDS = 73 * 3600.0
MAX_BYTES_PER_ID = 64


@pytest.fixture
def default_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A ``redis-server`` with Redis's default hash limits, whatever its package changed."""
    server = PrivateRedis(
        redis_port(),
        tmp_path,
        options=("--hash-max-listpack-entries", "128", "--hash-max-listpack-value", "64"),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def client(default_redis: PrivateRedis) -> AsyncIterator[Redis]:
    redis = Redis.from_url(default_redis.url)
    try:
        yield redis
    finally:
        await redis.aclose()


@pytest.fixture
async def claims(default_redis: PrivateRedis) -> AsyncIterator[RedisClaims]:
    store = RedisClaims(
        connect(parse_redis_url(default_redis.url), timeout=5.0),
        prefix=PREFIX,
        window_seconds=WINDOW_SECONDS,
    )
    await store.start()
    try:
        yield store
    finally:
        await store.commands.close()


async def claim_and_confirm(claims: RedisClaims, keys: list[str]) -> None:
    for start in range(0, len(keys), 5000):
        batch = await asyncio.gather(*(claims.claim(key, 10_000) for key in keys[start:][:5000]))
        assert all(claim.state is ClaimState.NEW for claim in batch)
        await asyncio.gather(*(claims.confirm(claim.key, claim.token) for claim in batch))


async def test_100_000_ids_cost_at_most_64_bytes_each(claims: RedisClaims, client: Redis) -> None:
    keys = [f"wh_memory_{n}" for n in range(100_000)]
    before = (await client.info("memory"))["used_memory"]
    await claim_and_confirm(claims, keys)
    after = (await client.info("memory"))["used_memory"]
    assert (after - before) / len(keys) <= MAX_BYTES_PER_ID
    assert await client.keys(f"{PREFIX}{{*}}:i:*") == []  # every claim was dropped on confirm
    for name in await remembering_hashes(client, PREFIX):
        assert await client.object("encoding", name) == b"listpack"
    for counts in await client.keys(f"{PREFIX}{{*}}:n"):
        assert await client.pttl(counts) > WINDOW_SECONDS * 1000  # and expires with the rest
    states = await asyncio.gather(*(claims.state(key) for key in keys[::97]))
    assert set(states) == {ClaimState.CONFIRMED}


async def test_a_crowded_group_splits_its_shards_and_forgets_nothing(
    claims: RedisClaims, client: Redis
) -> None:
    """3,000 ids of one group: its bucket splits into some eighty shards, one at a time."""
    crowd = (f"wh_crowd_{n}" for n in itertools.count())
    keys = list(itertools.islice((k for k in crowd if group_of(digest_of(k)) == 7), 3000))
    await claim_and_confirm(claims, keys)
    states = await asyncio.gather(*(claims.claim(key, 10_000) for key in keys))
    assert {claim.state for claim in states} == {ClaimState.CONFIRMED}
    shards = await remembering_hashes(client, PREFIX)
    assert len(shards) == 3000 // 36
    sizes = [await client.hlen(name) for name in shards]
    assert sum(sizes) == 3000
    assert max(sizes) < 128
    for name in shards:
        assert await client.object("encoding", name) == b"listpack"
    assert not any(await asyncio.gather(*(claims.state(f"wh_other_{n}") for n in range(500))))


async def test_ids_spread_over_groups_of_their_own_hash_slots(claims: RedisClaims) -> None:
    groups = {group_of(digest_of(f"wh_{n}")) for n in range(20_000)}
    assert groups == set(range(GROUPS))


async def test_the_previous_layout_is_read_for_one_window_after_the_first_start(
    default_redis: PrivateRedis, client: Redis
) -> None:
    await client.set(f"{PREFIX}wh_old_confirmed", b"confirmed", px=60_000)
    await client.set(f"{PREFIX}wh_old_in_flight", b"inflight:old-pod:1", px=60_000)
    upgraded = RedisClaims(
        connect(parse_redis_url(default_redis.url), timeout=5.0),
        prefix=PREFIX,
        window_seconds=WINDOW_SECONDS,
    )
    try:
        await upgraded.start()
        assert (await upgraded.claim("wh_old_confirmed", 10_000)).state is ClaimState.CONFIRMED
        assert (await upgraded.claim("wh_old_in_flight", 10_000)).state is ClaimState.IN_FLIGHT
        assert (await upgraded.claim("wh_new", 10_000)).state is ClaimState.NEW

        # A pod started a window after the first one no longer reads the previous layout.
        since = await client.get(f"{PREFIX}layout:compact-since")
        assert since is not None
        await client.set(f"{PREFIX}layout:compact-since", int(since) - int(WINDOW_SECONDS) - 1)
        await upgraded.start()
        assert (await upgraded.claim("wh_old_confirmed", 10_000)).state is ClaimState.NEW
    finally:
        await upgraded.commands.close()


async def test_hash_limits_below_the_defaults_are_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = PrivateRedis(redis_port(), tmp_path, options=("--hash-max-listpack-entries", "64"))
    server.start()
    store = RedisClaims(
        connect(parse_redis_url(server.url), timeout=5.0), prefix=PREFIX, window_seconds=3600
    )
    try:
        with caplog.at_level(logging.WARNING, logger="bridge.dedup"):
            await store.start()
    finally:
        await store.commands.close()
        server.stop()
    [warning] = [record.getMessage() for record in caplog.records]
    assert "hash-max-listpack-entries 64" in warning
    assert "at least 128" in warning
