"""A Redis idempotency store for :class:`bridge.consumer.EventConsumer`, shared by replicas.

Several replicas of one consuming service read one queue; when the same ``message_id``
reaches two of them, the first claims it and handles it, the other sees the claim and
hands its copy back to the queue until the first is done (then skips it) or released it
(then handles it). A replica that dies while handling leaves a claim that expires after
``claim_ttl_seconds``, after which a redelivered copy is handled.

Needs the ``redis`` extra (``pip install 'openai-webhook-bridge[redis]'``); without it,
constructing the store raises :class:`~bridge.extras.MissingExtraError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridge.dedup.store import Claim, ClaimState
from bridge.extras import MissingExtraError, installed
from bridge.redis_url import parse_redis_url

if TYPE_CHECKING:
    from bridge.dedup.redis_claims import RedisClaims


class RedisIdempotencyStore:
    """Claims, done marks and releases under ``webhook-consumer:<namespace>:``.

    ``url`` is any form ``BRIDGE_DEDUP_URL`` takes (one Redis, Sentinel, Cluster), with
    the bridge's compact layout (:mod:`bridge.dedup.redis_claims`).

    ``namespace`` names the consuming service (its queue name, say): services that each
    must handle every event need different namespaces; replicas of one service share one.
    ``claim_ttl_seconds`` must exceed the longest a handler runs; ``ttl_seconds`` is how
    long a handled id is remembered (OpenAI retries for up to 72 hours).
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str,
        ttl_seconds: float = 73 * 3600,
        claim_ttl_seconds: float = 300.0,
        timeout: float = 1.0,
    ) -> None:
        if not namespace:
            raise ValueError("namespace must name the consuming service, e.g. its queue")
        if ttl_seconds <= 0 or claim_ttl_seconds <= 0 or timeout <= 0:
            raise ValueError("ttl_seconds, claim_ttl_seconds and timeout must be positive")
        if not installed("redis"):
            raise MissingExtraError(type(self).__name__, "redis")
        from bridge.dedup.redis_claims import RedisClaims
        from bridge.dedup.redis_pipeline import connect

        self._claims: RedisClaims = RedisClaims(
            connect(parse_redis_url(url), timeout=timeout),
            prefix=f"webhook-consumer:{namespace}:",
            window_seconds=ttl_seconds,
        )
        self._claim_ttl_ms = round(claim_ttl_seconds * 1000)
        self._ours: dict[str, Claim] = {}
        self._started = False

    async def claim(self, message_id: str) -> ClaimState:
        if not self._started:
            await self._claims.start()
            self._started = True
        claim = await self._claims.claim(message_id, self._claim_ttl_ms)
        if claim.state is ClaimState.NEW:
            self._ours[message_id] = claim
        return claim.state

    async def done(self, message_id: str) -> None:
        claim = self._ours.pop(message_id, None)
        await self._claims.confirm(message_id, claim.token if claim is not None else b"")

    async def release(self, message_id: str) -> None:
        claim = self._ours.pop(message_id, None)
        if claim is not None:
            await self._claims.release(claim)

    async def close(self) -> None:
        await self._claims.commands.close()
