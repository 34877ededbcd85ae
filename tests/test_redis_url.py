"""The three forms of a Redis URL, as the bridge and the consumers' store read them."""

from __future__ import annotations

import pytest

from bridge.redis_url import RedisKind, parse_redis_url


def test_one_redis_is_redis_pys_own_url() -> None:
    location = parse_redis_url("rediss://bridge:pw-secret@redis.internal:6380/2")
    assert location.kind is RedisKind.SINGLE
    assert location.url == "rediss://bridge:pw-secret@redis.internal:6380/2"
    assert location.redacted == "rediss://bridge:***@redis.internal:6380/2"


def test_sentinels_then_the_masters_name_and_database() -> None:
    location = parse_redis_url("redis+sentinel://:pw-secret@s1:26380,s2,[::1]:26381/webhooks/3")
    assert location.kind is RedisKind.SENTINEL
    assert location.hosts == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert (location.service_name, location.db) == ("webhooks", 3)
    assert (location.username, location.password) == (None, "pw-secret")
    assert location.redacted == "redis+sentinel://:***@s1:26380,s2,[::1]:26381/webhooks/3"


def test_cluster_seed_nodes() -> None:
    location = parse_redis_url("redis+cluster://bridge:pw-secret@n1:7000,n2:7001")
    assert location.kind is RedisKind.CLUSTER
    assert location.hosts == (("n1", 7000), ("n2", 7001))
    assert (location.username, location.password) == ("bridge", "pw-secret")
    assert "pw-secret" not in location.redacted


@pytest.mark.parametrize(
    "text",
    [
        "redis+sentinel://:pw-secret@s1:26379",
        "redis+sentinel://:pw-secret@s1:26379/m/one",
        "redis+sentinel://:pw-secret@s1:26379/m?ssl=true",
        "redis+cluster://:pw-secret@n1:port",
        "redis+cluster://:pw-secret@n1:7000/0",
        "redis+cluster://:pw-secret@n1:7000,,n2:7001",
        "redis-sentinel://:pw-secret@s1:26379/m",
        "redis://:pw-secret@",
    ],
)
def test_a_malformed_url_is_refused_in_one_line_without_its_password(text: str) -> None:
    with pytest.raises(ValueError) as refusal:  # noqa: PT011 - the message is checked below
        parse_redis_url(text)
    message = str(refusal.value)
    assert "\n" not in message
    assert "pw-secret" not in message
