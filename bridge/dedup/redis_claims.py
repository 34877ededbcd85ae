"""Claims and confirmations in Redis, shared by every pod (and every consumer replica).

A confirmed id costs about 30 bytes of Redis memory, not a key of its own (about 200):

- Ids are spread over ``GROUPS`` groups by a 16-byte BLAKE2b digest of the id. A group's
  keys share a hash tag (``<prefix>{<group>}:...``), so each group lives in one hash slot:
  a script may touch all of its keys in a Redis Cluster, and the groups spread over
  every master.
- Within a group, a confirmed id is a field (its digest, with an empty value) of a small
  hash, ``<prefix>{g}:c:<bucket>:<shard>``. ``<bucket>`` numbers the stretch of
  ``window / BUCKETS`` during which it was confirmed (Redis's clock), and each bucket's
  hashes expire together one window after the bucket ends, so an id is remembered for
  one window and at most a quarter more. Within a bucket, ids are spread over as many
  shards as keep each one at 36 to 72 fields on average (linear hashing: one shard is
  split in two each time the bucket's count grows by 36, its fields moved by a script),
  so every hash stays in Redis's compact listpack encoding (up to 128 fields by default,
  ``hash-max-listpack-entries``) at any number of ids; ``<prefix>{g}:n`` counts the ids
  of each bucket, which says how many shards it has.
- An in-flight claim is a plain key, ``<prefix>{g}:i:<id>``, holding the claimant's token,
  with a TTL: it expires by itself when the claimant died mid-publish.

Scripts make each step atomic: a claim looks the id up in every bucket of the window and
only then sets the in-flight key (``NX``); a confirm adds the field (splitting a shard if
due) and deletes the in-flight key if it still holds our token; a release deletes the
in-flight key only if it still holds our token, so a claim that expired and was taken
over by another pod is left alone.

The previous layout (one string key per id, ``<prefix><id>``, holding ``confirmed`` or an
``inflight:`` token) is still read during an upgrade: claims also look at that key until
one window has passed since the first process of this layout started (recorded in
``<prefix>layout:compact-since``), by which time every key of the previous layout has
expired by itself. Not in a cluster, which never held the previous layout.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable
from typing import Any

from bridge.dedup.redis_pipeline import Commands
from bridge.dedup.store import Claim, ClaimState, StoreUnavailable
from bridge.extras import MissingExtraError

try:
    from redis.exceptions import NoScriptError
except ImportError as missing:
    raise MissingExtraError(__name__, "redis") from missing

logger = logging.getLogger(__name__)

GROUPS = 1024
"""Hash-tagged groups of ids: enough to spread over a cluster's masters, few enough that
100,000 ids in a window fill each group's hashes with tens of fields."""
BUCKETS = 4
"""A window is remembered in this many buckets of time, plus the one filling now: a claim
looks in each (more buckets: less memory held past the window, more work per claim)."""
DIGEST_BYTES = 16
"""128 bits: two different ids share a digest with a probability of about 10^-22 among
300 million, which would answer the later one as a duplicate."""
LISTPACK_ENTRIES_NEEDED = 128
"""The fullest shard stays well below this many fields (Redis's default)."""

_SHARDS_LUA = (
    b"""
local LOAD = 36
local BUCKETS = %d
local function shards(count)
  return math.max(1, math.floor(count / LOAD))
end
local function power_below(n)
  local low = 1
  while low * 2 <= n do low = low * 2 end
  return low
end
local function shard_of(h, count)
  local n = shards(count)
  local low = power_below(n)
  local shard = h %% low
  if shard < n - low then shard = h %% (low * 2) end
  return shard
end
local function current_bucket(width)
  local now = redis.call('TIME')
  return math.floor((tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)) / width)
end
-- Numbers reach redis.call and `..` formatted as '%%.17g' (or '%%.14g'), several times
-- slower than '%%d': every number sent to Redis or put into a key name goes through this.
local function int(n)
  return string.format('%%d', n)
end
"""
    % BUCKETS
)

# KEYS[1] the id's in-flight claim, KEYS[2] its group's counts, KEYS[3] (during an upgrade)
# its key in the previous layout. ARGV[1] the stem of the group's shards, ARGV[2] the
# digest, ARGV[3] our token, ARGV[4] the claim's TTL (ms), ARGV[5] a bucket's width (ms),
# ARGV[6] "claim" (set the in-flight key if free) or "look" (only read it).
# Returns 1 (confirmed), nil (ours now; or, looking, nothing there) or another's token.
CLAIM_SCRIPT = (
    _SHARDS_LUA
    + b"""
local stem, digest = ARGV[1], ARGV[2]
local h = struct.unpack('>I4', digest)
-- One bucket ahead: another server's clock (a replica promoted since) may be ahead.
local newest = current_bucket(tonumber(ARGV[5])) + 1
local buckets = {}
for bucket = newest - BUCKETS - 1, newest do buckets[#buckets + 1] = int(bucket) end
local counts = redis.call('HMGET', KEYS[2], unpack(buckets))
for i = #buckets, 1, -1 do
  if counts[i] then
    local shard = stem .. buckets[i] .. ':' .. int(shard_of(h, tonumber(counts[i])))
    if redis.call('HEXISTS', shard, digest) == 1 then return 1 end
  end
end
if KEYS[3] then
  local previous = redis.call('GET', KEYS[3])
  if previous == 'confirmed' then return 1 end
  if previous then return previous end
end
if ARGV[6] == 'look' then return redis.call('GET', KEYS[1]) end
return redis.call('SET', KEYS[1], ARGV[3], 'NX', 'PX', ARGV[4], 'GET')
"""
)

# KEYS[1] the id's in-flight claim, KEYS[2] its group's counts. ARGV[1] the stem of the
# group's shards, ARGV[2] the digest, ARGV[3] our token, ARGV[4] a bucket's width (ms).
CONFIRM_SCRIPT = (
    _SHARDS_LUA
    + b"""
local stem, digest = ARGV[1], ARGV[2]
local width = tonumber(ARGV[4])
local bucket = current_bucket(width)
local bucket_name = int(bucket)
local expire_at = int((bucket + 1 + BUCKETS) * width)
local count = tonumber(redis.call('HGET', KEYS[2], bucket_name) or '0')
local bucket_stem = stem .. bucket_name .. ':'
local shard = bucket_stem .. int(shard_of(struct.unpack('>I4', digest), count))
if redis.call('HSET', shard, digest, '') == 1 then
  redis.call('PEXPIREAT', shard, expire_at)
  if count == 0 then
    for _, old in ipairs(redis.call('HKEYS', KEYS[2])) do
      if tonumber(old) < bucket - BUCKETS - 1 then redis.call('HDEL', KEYS[2], old) end
    end
  end
  redis.call('HSET', KEYS[2], bucket_name, int(count + 1))
  if count == 0 then redis.call('PEXPIREAT', KEYS[2], expire_at) end
  local before = shards(count)
  if shards(count + 1) > before then
    -- Linear hashing: shard (before - low) splits into itself and the new shard `before`.
    local low = power_below(before)
    local from, to = bucket_stem .. int(before - low), bucket_stem .. int(before)
    local moving, fields = {}, {}
    for _, field in ipairs(redis.call('HKEYS', from)) do
      if struct.unpack('>I4', field) % (low * 2) == before then
        moving[#moving + 1] = field
        fields[#fields + 1] = field
        fields[#fields + 1] = ''
      end
    end
    if #moving > 0 then
      redis.call('HSET', to, unpack(fields))
      redis.call('PEXPIREAT', to, expire_at)
      redis.call('HDEL', from, unpack(moving))
    end
  end
end
if redis.call('GET', KEYS[1]) == ARGV[3] then redis.call('DEL', KEYS[1]) end
return 1
"""
)

# KEYS[1] the claimed key, ARGV[1] our token: delete only what we still own.
RELEASE_SCRIPT = b"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class Script:
    """A Lua script run by its SHA1, sent whole only when a server does not hold it yet
    (a new server, a promoted replica, a restart), as redis-py's ``register_script`` does
    for its own clients."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.sha = hashlib.sha1(body, usedforsecurity=False).hexdigest().encode()

    async def run(self, commands: Commands, tail: tuple[bytes, ...]) -> Any:
        """Run it with ``tail``: the number of keys, the keys, then the arguments."""
        return await self.send(commands, tail)

    def send(self, commands: Commands, tail: tuple[bytes, ...]) -> asyncio.Future[Any]:
        """Queue it in this turn's pipeline, to be waited for or not: the future answers
        what :meth:`run` returns or raises."""
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        by_sha = commands.run((b"EVALSHA", self.sha, *tail))
        by_sha.add_done_callback(functools.partial(self._whole_if_unknown, commands, tail, answer))
        return answer

    def _whole_if_unknown(
        self,
        commands: Commands,
        tail: tuple[bytes, ...],
        answer: asyncio.Future[Any],
        by_sha: asyncio.Future[Any],
    ) -> None:
        if not by_sha.cancelled() and isinstance(by_sha.exception(), NoScriptError):
            whole = commands.run((b"EVAL", self.body, *tail))
            whole.add_done_callback(functools.partial(_pass_on, answer))
        else:
            _pass_on(answer, by_sha)


def _pass_on(answer: asyncio.Future[Any], outcome: asyncio.Future[Any]) -> None:
    if answer.done():
        return
    if outcome.cancelled():
        answer.cancel()
    elif (error := outcome.exception()) is not None:
        answer.set_exception(error)
    else:
        answer.set_result(outcome.result())


_CLAIM = Script(CLAIM_SCRIPT)
_CONFIRM = Script(CONFIRM_SCRIPT)
_RELEASE = Script(RELEASE_SCRIPT)


class _Group:
    """The names of one group's keys, built once: a claim costs no formatting."""

    __slots__ = ("counts", "in_flight", "stem", "tag")

    def __init__(self, prefix: bytes, group: int) -> None:
        self.tag = prefix + b"{%d}:" % group
        self.counts = self.tag + b"n"
        self.stem = self.tag + b"c:"
        self.in_flight = self.tag + b"i:"


def digest_of(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=DIGEST_BYTES).digest()


def group_of(digest: bytes) -> int:
    # The last bytes: the scripts shard by the first four, so the two stay independent.
    return int.from_bytes(digest[-2:], "big") % GROUPS


_TWO_KEYS = b"2"
_THREE_KEYS = b"3"


class RedisClaims:
    """Claim, confirm and release ids under one key prefix, remembered for ``window_seconds``."""

    def __init__(self, commands: Commands, *, prefix: str, window_seconds: float) -> None:
        self.commands = commands
        self.prefix = prefix.encode()
        self.window_seconds = window_seconds
        self._bucket_ms = b"%d" % max(1, math.ceil(window_seconds * 1000 / BUCKETS))
        self._groups = [_Group(self.prefix, group) for group in range(GROUPS)]
        owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._tokens = (f"inflight:{owner}:{n}".encode() for n in itertools.count())
        self._probe_name = f"probe:{socket.gethostname()}:{os.getpid()}".encode()
        # Until start() read when this layout was first used, the previous one is read too.
        self._previous_layout_until = 0.0 if commands.sharded else math.inf

    async def start(self) -> None:
        """Load the scripts; find out how long the previous layout is still read; warn
        once if Redis's configuration would store the hashes in their large encoding."""
        if not self.commands.sharded:  # a cluster's masters learn them on first use
            for script in (_CLAIM, _CONFIRM, _RELEASE):
                await self.commands.run((b"SCRIPT", b"LOAD", script.body))
            marker = self.prefix + b"layout:compact-since"
            now = time.time()
            since = await self.commands.run((b"SET", marker, b"%d" % now, b"NX", b"GET"))
            self._previous_layout_until = float(since or now) + self.window_seconds
        await self._check_listpack_limits()

    async def claim(self, key: str, ttl_ms: int) -> Claim:
        token = next(self._tokens)
        held = await self._look(key, token, b"%d" % ttl_ms, b"claim")
        if held is None:
            return Claim(key, ClaimState.NEW, token)
        return Claim(key, state_of(held))

    async def state(self, key: str) -> ClaimState | None:
        """What the store holds for ``key`` now; ``None`` when nothing (released or expired)."""
        held = await self._look(key, b"", b"0", b"look")
        return None if held is None else state_of(held)

    def confirm(self, key: str, token: bytes = b"") -> asyncio.Future[Any]:
        """Remember ``key`` for the window, and drop our in-flight claim of it (``token``):
        queued in this turn's pipeline; the future fails with :class:`StoreUnavailable`."""
        name = key.encode()
        digest = hashlib.blake2b(name, digest_size=DIGEST_BYTES).digest()
        group = self._groups[group_of(digest)]
        return self.confirm_digest(digest, group.in_flight + name, token)

    def confirm_digest(self, digest: bytes, in_flight: bytes, token: bytes) -> asyncio.Future[Any]:
        group = self._groups[group_of(digest)]
        tail = (_TWO_KEYS, in_flight, group.counts, group.stem, digest, token, self._bucket_ms)
        return _CONFIRM.send(self.commands, tail)

    async def release(self, claim: Claim) -> None:
        name = claim.key.encode()
        group = self._groups[group_of(digest_of(claim.key))]
        await _RELEASE.run(self.commands, (b"1", group.in_flight + name, claim.token))

    async def write_probe(self) -> None:
        """A write to every group's master (one, without a cluster): a replica (READONLY)
        or a full Redis (OOM) answers a PING too."""
        groups = self._groups if self.commands.sharded else self._groups[:1]
        writes = [
            self.commands.run((b"SET", group.tag + self._probe_name, b"1", b"PX", b"5000"))
            for group in groups
        ]
        for outcome in await asyncio.gather(*writes, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome

    def _look(self, key: str, token: bytes, ttl_ms: bytes, mode: bytes) -> Awaitable[Any]:
        name = key.encode()
        digest = hashlib.blake2b(name, digest_size=DIGEST_BYTES).digest()
        group = self._groups[group_of(digest)]
        in_flight = group.in_flight + name
        args = (group.stem, digest, token, ttl_ms, self._bucket_ms, mode)
        tail: tuple[bytes, ...]
        if time.time() < self._previous_layout_until:
            tail = (_THREE_KEYS, in_flight, group.counts, self.prefix + name, *args)
        else:
            tail = (_TWO_KEYS, in_flight, group.counts, *args)
        return _CLAIM.run(self.commands, tail)

    async def _check_listpack_limits(self) -> None:
        try:
            masters = await self.commands.config_get("hash-max-listpack-*")
        except StoreUnavailable:
            # CONFIG is often renamed or refused by managed Redis: nothing to check then.
            logger.debug("could not read Redis's hash-max-listpack-* settings")
            return
        for limits in masters:
            entries = int(limits.get("hash-max-listpack-entries", LISTPACK_ENTRIES_NEEDED))
            value = int(limits.get("hash-max-listpack-value", DIGEST_BYTES))
            if entries < LISTPACK_ENTRIES_NEEDED or value < DIGEST_BYTES:
                logger.warning(
                    "Redis has hash-max-listpack-entries %d and hash-max-listpack-value %d: "
                    "remembered ids will take about four times the memory; set them to at "
                    "least %d and %d (Redis's defaults)",
                    entries,
                    value,
                    LISTPACK_ENTRIES_NEEDED,
                    DIGEST_BYTES,
                )
                return


def state_of(value: Any) -> ClaimState:
    # 1 is the scripts' word for confirmed; anything else held (a token, or a value written
    # by something else under our prefix) counts as in flight: never a 2xx on a guess.
    return ClaimState.CONFIRMED if value == 1 else ClaimState.IN_FLIGHT
