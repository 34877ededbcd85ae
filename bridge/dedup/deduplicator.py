"""Publishing each ``webhook-id`` once: per process always, across pods with a shared store.

OpenAI retries a delivery it did not see answered, so the same signed webhook can arrive
twice: concurrently (a retry racing a slow confirm), again a moment later, or at another
pod. Copies arriving in this process while the first one's publish is in flight wait for
its outcome. Otherwise the store is asked: an id confirmed within the window is a
duplicate; an id in flight at another pod is waited for, and answered as a duplicate only
once that pod confirmed it. A 2xx never stands for a publish that was not confirmed.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from bridge.dedup.store import Claim, ClaimState, DedupStore, StoreUnavailable
from bridge.metrics import DedupResult

T = TypeVar("T")


class OnStoreError(enum.StrEnum):
    PUBLISH = "publish"
    """Publish without the check: nothing is refused, the cost is a possible duplicate."""
    REJECT = "reject"
    """Answer 503: nothing is published twice, OpenAI retries once the store is back."""


class DedupRefused(Exception):
    """The copy cannot be answered 2xx now; a retry can be (a 503)."""


class FirstCopyAbandoned(DedupRefused):
    """The copy being waited on was cancelled before it finished."""


class DuplicateNotConfirmed(DedupRefused):
    """Another pod holds the id and did not confirm it within the wait."""


class DedupStoreUnavailable(DedupRefused):
    """The store is unreachable and ``BRIDGE_DEDUP_ON_ERROR=reject``."""


class Deduplicator(Generic[T]):
    def __init__(
        self,
        store: DedupStore,
        *,
        wait_seconds: float,
        on_store_error: OnStoreError = OnStoreError.PUBLISH,
        record: Callable[[DedupResult], None] = lambda _result: None,
    ) -> None:
        self.store = store
        self._wait_seconds = wait_seconds
        self._reject_without_store = on_store_error is OnStoreError.REJECT
        self._record = record
        self._in_flight: dict[str, asyncio.Future[T | None] | None] = {}

    @property
    def ready(self) -> bool:
        """False only while requests would be refused for want of the store."""
        return self.store.available or not self._reject_without_store

    async def once(self, key: str, action: Callable[[], Awaitable[T]]) -> T | None:
        """Run ``action`` unless ``key`` was confirmed or is running.

        Returns the action's result, or ``None`` for a duplicate: ``key`` was confirmed
        within the window (here or at another pod), or the copy running now succeeded. A
        failed action is not remembered, so a retry runs it again; copies waiting on it
        fail with the same error. Raises :class:`DedupRefused` when no 2xx is possible yet.
        """
        if key in self._in_flight:
            self._record(DedupResult.DUPLICATE)
            await asyncio.shield(self._outcome_of(key))
            return None

        # The outcome's future is made only when a copy comes to wait for it: most ids
        # arrive once, and a future per request would cost every one of them.
        self._in_flight[key] = None
        try:
            result = await self._first_copy(key, action)
        except BaseException as error:
            waited_on = self._in_flight[key]
            if waited_on is not None:
                waited_on.set_exception(
                    error if isinstance(error, Exception) else FirstCopyAbandoned(key)
                )
                waited_on.exception()  # retrieved here, so a copy-less failure is not reported
            raise
        else:
            waited_on = self._in_flight[key]
            if waited_on is not None:
                waited_on.set_result(result)
            return result
        finally:
            del self._in_flight[key]

    def _outcome_of(self, key: str) -> asyncio.Future[T | None]:
        future = self._in_flight[key]
        if future is None:
            future = self._in_flight[key] = asyncio.get_running_loop().create_future()
        return future

    async def _first_copy(self, key: str, action: Callable[[], Awaitable[T]]) -> T | None:
        try:
            claim = await self.store.claim(key)
        except StoreUnavailable:
            self._record(DedupResult.STORE_ERROR)
            if self._reject_without_store:
                raise DedupStoreUnavailable("deduplication store unavailable") from None
            return await action()
        if claim.state is ClaimState.CONFIRMED:
            self._record(DedupResult.DUPLICATE)
            return None
        if claim.state is ClaimState.IN_FLIGHT:
            self._record(DedupResult.WAITED)
            if await self.store.wait_confirmed(key, self._wait_seconds):
                return None
            raise DuplicateNotConfirmed("a copy in flight elsewhere was not confirmed in time")
        self._record(DedupResult.NEW)
        return await self._run_claimed(claim, action)

    async def _run_claimed(self, claim: Claim, action: Callable[[], Awaitable[T]]) -> T:
        try:
            result = await action()
        except BaseException:
            await self.store.release(claim)
            raise
        # Not waited for: the publish is confirmed, so the 2xx stands whatever the store
        # answers, and a copy arriving meanwhile finds the claim in flight and waits.
        self.store.confirm(claim)
        return result
