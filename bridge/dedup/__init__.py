"""Deduplication of ``webhook-id``\\ s: in this process by default, across pods with Redis.

The ingress sees a :class:`Deduplicator` over a :class:`DedupStore`; which store it is
(:class:`InProcessStore` or :class:`~bridge.dedup.redis_store.RedisStore`) is decided
here, from the settings. The Redis client is imported only when ``BRIDGE_DEDUP_URL``
is set, so the ``redis`` extra stays optional.
"""

from __future__ import annotations

from collections.abc import Callable

from bridge.dedup.deduplicator import (
    Deduplicator,
    DedupRefused,
    DedupStoreUnavailable,
    DuplicateNotConfirmed,
    FirstCopyAbandoned,
    OnStoreError,
)
from bridge.dedup.memory import InProcessStore
from bridge.dedup.store import Claim, ClaimState, DedupStore, StoreUnavailable
from bridge.settings import Settings

__all__ = [
    "Claim",
    "ClaimState",
    "DedupRefused",
    "DedupStore",
    "DedupStoreUnavailable",
    "Deduplicator",
    "DuplicateNotConfirmed",
    "FirstCopyAbandoned",
    "InProcessStore",
    "OnStoreError",
    "StoreUnavailable",
    "store_from_settings",
]

_WHILE_DOWN = {
    OnStoreError.PUBLISH: "publishing without the duplicate check",
    OnStoreError.REJECT: "answering 503 and not ready",
}


def store_from_settings(
    settings: Settings, observe_seconds: Callable[[float], None] = lambda _seconds: None
) -> DedupStore:
    """The store ``settings`` ask for; ``observe_seconds`` receives each store call's latency."""
    if not settings.dedup_url.get_secret_value():
        return InProcessStore(
            window_seconds=settings.dedup_window_seconds, max_ids=settings.dedup_max_ids
        )
    from bridge.dedup.redis_pipeline import connect
    from bridge.dedup.redis_store import RedisStore

    return RedisStore(
        connect(settings.dedup_location, timeout=settings.dedup_timeout),
        prefix=settings.dedup_key_prefix,
        window_seconds=settings.dedup_window_seconds,
        claim_ttl_seconds=settings.dedup_claim_ttl,
        timeout=settings.dedup_timeout,
        location=settings.dedup_url_redacted,
        while_down=_WHILE_DOWN[OnStoreError(settings.dedup_on_error)],
        observe_seconds=observe_seconds,
    )
