"""What a remembered ``webhook-id`` costs in Redis: ``used_memory`` growth per id.

Two measurements:

- through the bridge: the ``bridge-redis`` row reads ``used_memory`` before and after each
  point (:func:`used_memory`), and the report divides the growth by the requests answered;
- ``python -m bench --dedup-fill``: ids confirmed straight into the store with the
  bridge's own scripts (:func:`run_fill`), at two densities. 100,000 ids spread over every
  group as a 73-hour window would spread them; and the density of 300 million ids in a
  window, measured on a few groups and extrapolated (see :func:`_large_end`).

Use a Redis of the run's own (``--dedup-url``): ``used_memory`` counts every client's keys.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from dataclasses import dataclass

from bridge.dedup.redis_claims import BUCKETS, GROUPS, RedisClaims
from bridge.dedup.redis_pipeline import connect
from bridge.redis_url import RedisKind, parse_redis_url

WINDOW_SECONDS = 73 * 3600.0
SMALL_END = 100_000
LARGE_END = 300_000_000
SAMPLED_GROUPS = 8
"""Groups filled at the large end's density: each is as full as all 1,024 would be."""
BATCH = 5_000


def used_memory(url: str) -> int | None:
    """Redis's ``used_memory`` at ``url``; ``None`` for Sentinel or Cluster URLs (several
    servers) or when Redis does not answer."""
    location = parse_redis_url(url)
    if location.kind is not RedisKind.SINGLE:
        return None
    from redis import Redis
    from redis.exceptions import RedisError

    try:
        with Redis.from_url(url, socket_timeout=5) as client:
            return int(client.info("memory")["used_memory"])
    except (RedisError, OSError):
        return None


@dataclass(frozen=True)
class Fill:
    label: str
    ids: int
    bytes_per_id: float
    keys: int


async def _fill(claims: RedisClaims, url: str, ids: list[str] | list[bytes], label: str) -> Fill:
    before = used_memory(url)
    keys_before = await claims.commands.run((b"DBSIZE",))
    for start in range(0, len(ids), BATCH):
        batch = ids[start : start + BATCH]
        await asyncio.gather(*(_confirm(claims, item) for item in batch))
    after = used_memory(url)
    keys_after = await claims.commands.run((b"DBSIZE",))
    if before is None or after is None:
        raise SystemExit(f"Redis at {parse_redis_url(url).redacted} stopped answering")
    return Fill(label, len(ids), (after - before) / len(ids), keys_after - keys_before)


async def _confirm(claims: RedisClaims, item: str | bytes) -> None:
    if isinstance(item, str):
        await claims.confirm(item)
    else:
        await claims.confirm_digest(item, claims.prefix + b"fill:no-claim", b"")


def _digests_in_groups(count_per_group: int, groups: range) -> list[bytes]:
    """Random digests whose last two bytes put them in ``groups`` (see ``group_of``)."""
    return [
        os.urandom(14) + group.to_bytes(2, "big")
        for group in groups
        for _ in range(count_per_group)
    ]


async def _delete_prefix(claims: RedisClaims) -> None:
    cursor = b"0"
    while True:
        cursor, names = await claims.commands.run(
            (b"SCAN", cursor, b"MATCH", claims.prefix + b"*", b"COUNT", b"5000")
        )
        if names:
            await claims.commands.run((b"UNLINK", *names))
        if cursor in (b"0", 0):
            return


def _large_end(measured: Fill) -> tuple[float, int]:
    """Bytes per id at ``LARGE_END`` ids: the sampled groups' structures cost the same in
    every group (each is its own keys), so their bytes per id carry over; what grows with
    the whole is Redis's table of keys and table of expiries, 8 bytes per slot each, a
    power of two of slots at least as many as keys. Returns it and the keys in all."""
    keys_per_group_bucket = measured.keys / SAMPLED_GROUPS
    total_keys = round(keys_per_group_bucket * GROUPS * BUCKETS)
    slots = 1 << (total_keys - 1).bit_length()
    tables_per_id = 2 * 8 * slots / LARGE_END
    return measured.bytes_per_id + tables_per_id, total_keys


async def fill(url: str) -> list[str]:
    if parse_redis_url(url).kind is not RedisKind.SINGLE or used_memory(url) is None:
        raise SystemExit(f"--dedup-fill needs one Redis (redis://) that answers: {url}")
    claims = RedisClaims(
        connect(parse_redis_url(url), timeout=30.0),
        prefix=f"bench-fill:{secrets.token_hex(4)}:",
        window_seconds=WINDOW_SECONDS,
    )
    # A window's ids are spread over BUCKETS buckets of time; a fill happens in one, so
    # the large end fills GROUPS x BUCKETS' worth into the sampled groups of the current one.
    per_group_bucket = LARGE_END // (GROUPS * BUCKETS)
    lines = [
        "| ids in the window | measured on | bytes per id | keys |",
        "| ---: | --- | ---: | ---: |",
    ]
    try:
        await claims.start()
        small = await _fill(
            claims,
            url,
            [f"wh_fill_{n}" for n in range(SMALL_END)],
            f"{SMALL_END:,} ids over all {GROUPS} groups",
        )
        await _delete_prefix(claims)
        # The small end as a window would hold it: spread over BUCKETS buckets, each group's
        # bucket holds a quarter as many; filling one bucket is the denser (cheaper) case.
        lines.append(
            f"| {SMALL_END:,} | {small.label}, one bucket of time | "
            f"{small.bytes_per_id:.1f} | {small.keys:,} |"
        )
        sparse = await _fill(
            claims,
            url,
            [f"wh_sparse_{n}" for n in range(SMALL_END // BUCKETS)],
            f"{SMALL_END // BUCKETS:,} ids over all {GROUPS} groups",
        )
        await _delete_prefix(claims)
        lines.append(
            f"| {SMALL_END:,} | {sparse.label} (a window's bucket of {SMALL_END:,}) | "
            f"{sparse.bytes_per_id:.1f} | {sparse.keys:,} |"
        )
        dense = await _fill(
            claims,
            url,
            _digests_in_groups(per_group_bucket, range(SAMPLED_GROUPS)),
            f"{SAMPLED_GROUPS} groups x {per_group_bucket:,} ids",
        )
        large, total_keys = _large_end(dense)
        lines.append(
            f"| {LARGE_END:,} | {dense.label} (one group's bucket at that size): "
            f"{dense.bytes_per_id:.1f}, plus Redis's key and expiry tables for "
            f"{total_keys:,} keys | {large:.1f} | {total_keys:,} (extrapolated) |"
        )
    finally:
        await _delete_prefix(claims)
        await claims.commands.close()
    return lines


def run_fill(url: str) -> int:
    lines = asyncio.run(fill(url))
    print("\n".join(lines))
    sys.stdout.flush()
    return 0
