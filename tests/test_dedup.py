"""The deduplication semantics, over a fake store: what is published, answered and remembered."""

from __future__ import annotations

import asyncio
import importlib.util
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from bridge.dedup import (
    Claim,
    ClaimState,
    Deduplicator,
    DedupStoreUnavailable,
    DuplicateNotConfirmed,
    FirstCopyAbandoned,
    InProcessStore,
    OnStoreError,
    StoreUnavailable,
)
from bridge.metrics import DedupResult
from bridge.settings import SettingsError
from tests.conftest import Signer, make_settings


@dataclass
class FakeStore:
    """Answers claims from ``states``; records every confirm and release."""

    states: dict[str, ClaimState] = field(default_factory=dict)
    confirmed_later: set[str] = field(default_factory=set)
    """Ids in flight elsewhere that the other pod confirms while we wait."""
    available: bool = True
    confirmed: list[str] = field(default_factory=list)
    released: list[Claim] = field(default_factory=list)
    waits: list[tuple[str, float]] = field(default_factory=list)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def claim(self, key: str) -> Claim:
        if not self.available:
            raise StoreUnavailable("down")
        state = self.states.get(key)
        if state is None:
            self.states[key] = ClaimState.IN_FLIGHT
            return Claim(key, ClaimState.NEW, b"our-token")
        return Claim(key, state)

    def confirm(self, claim: Claim) -> asyncio.Future[None]:
        self.confirmed.append(claim.key)
        self.states[claim.key] = ClaimState.CONFIRMED
        landed = asyncio.get_running_loop().create_future()
        landed.set_result(None)
        return landed

    async def release(self, claim: Claim) -> None:
        self.released.append(claim)
        del self.states[claim.key]

    async def wait_confirmed(self, key: str, within: float) -> bool:
        self.waits.append((key, within))
        return key in self.confirmed_later


@dataclass
class Action:
    """A publish that succeeds (after ``delay``) or raises ``error``, counting its calls."""

    error: Exception | None = None
    delay: float = 0.0
    calls: int = 0

    async def __call__(self) -> str:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return "published"


def deduplicator(
    store: FakeStore | InProcessStore,
    results: Counter[DedupResult],
    on_store_error: OnStoreError = OnStoreError.PUBLISH,
) -> Deduplicator[str]:
    return Deduplicator(
        store,
        wait_seconds=5.0,
        on_store_error=on_store_error,
        record=lambda result: results.update([result]),
    )


@pytest.fixture
def results() -> Counter[DedupResult]:
    return Counter()


async def test_a_new_id_is_published_then_confirmed(results: Counter[DedupResult]) -> None:
    store, action = FakeStore(), Action()
    assert await deduplicator(store, results).once("wh_1", action) == "published"
    assert action.calls == 1
    assert store.confirmed == ["wh_1"]
    assert store.released == []
    assert results == {DedupResult.NEW: 1}


async def test_a_confirmed_id_is_a_duplicate_and_not_published(
    results: Counter[DedupResult],
) -> None:
    store, action = FakeStore({"wh_1": ClaimState.CONFIRMED}), Action()
    assert await deduplicator(store, results).once("wh_1", action) is None
    assert action.calls == 0
    assert results == {DedupResult.DUPLICATE: 1}


async def test_in_flight_elsewhere_and_then_confirmed_is_a_duplicate(
    results: Counter[DedupResult],
) -> None:
    store = FakeStore({"wh_1": ClaimState.IN_FLIGHT}, confirmed_later={"wh_1"})
    action = Action()
    assert await deduplicator(store, results).once("wh_1", action) is None
    assert action.calls == 0
    assert store.waits == [("wh_1", 5.0)]  # bounded by the publish timeout
    assert results == {DedupResult.WAITED: 1}


async def test_in_flight_elsewhere_and_never_confirmed_is_refused(
    results: Counter[DedupResult],
) -> None:
    store, action = FakeStore({"wh_1": ClaimState.IN_FLIGHT}), Action()
    with pytest.raises(DuplicateNotConfirmed):
        await deduplicator(store, results).once("wh_1", action)
    assert action.calls == 0
    assert store.confirmed == []


async def test_a_failed_publish_releases_the_claim_and_is_not_remembered(
    results: Counter[DedupResult],
) -> None:
    store, failing = FakeStore(), Action(error=ConnectionError("nack"))
    dedup = deduplicator(store, results)
    with pytest.raises(ConnectionError):
        await dedup.once("wh_1", failing)
    assert [claim.token for claim in store.released] == [b"our-token"]
    assert store.confirmed == []
    retry = Action()
    assert await dedup.once("wh_1", retry) == "published"
    assert retry.calls == 1


async def test_a_cancelled_publish_releases_the_claim(results: Counter[DedupResult]) -> None:
    store = FakeStore()
    task = asyncio.create_task(deduplicator(store, results).once("wh_1", Action(delay=10)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(store.released) == 1
    assert "wh_1" not in store.states


async def test_copies_in_this_process_share_the_first_copys_outcome(
    results: Counter[DedupResult],
) -> None:
    store, action = FakeStore(), Action(delay=0.05)
    dedup = deduplicator(store, results)
    answers = await asyncio.gather(*(dedup.once("wh_1", action) for _ in range(5)))
    assert sorted(answers, key=str) == [None, None, None, None, "published"]
    assert action.calls == 1
    assert store.confirmed == ["wh_1"]  # one claim and one confirm for all five copies
    assert results == {DedupResult.NEW: 1, DedupResult.DUPLICATE: 4}


async def test_copies_in_this_process_share_a_failure(results: Counter[DedupResult]) -> None:
    store, action = FakeStore(), Action(delay=0.05, error=ConnectionError("lost"))
    dedup = deduplicator(store, results)
    answers = await asyncio.gather(
        *(dedup.once("wh_1", action) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(answer, ConnectionError) for answer in answers)
    assert action.calls == 1


async def test_a_cancelled_first_copy_fails_its_waiting_copies(
    results: Counter[DedupResult],
) -> None:
    dedup = deduplicator(FakeStore(), results)
    first = asyncio.create_task(dedup.once("wh_1", Action(delay=10)))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(dedup.once("wh_1", Action()))
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(FirstCopyAbandoned):
        await second


async def test_store_down_in_publish_mode_publishes_unchecked(
    results: Counter[DedupResult],
) -> None:
    store, action = FakeStore(available=False), Action()
    dedup = deduplicator(store, results, OnStoreError.PUBLISH)
    assert await dedup.once("wh_1", action) == "published"
    assert action.calls == 1
    assert store.confirmed == []
    assert dedup.ready
    assert results == {DedupResult.STORE_ERROR: 1}


async def test_store_down_in_reject_mode_refuses_and_is_not_ready(
    results: Counter[DedupResult],
) -> None:
    store, action = FakeStore(available=False), Action()
    dedup = deduplicator(store, results, OnStoreError.REJECT)
    with pytest.raises(DedupStoreUnavailable):
        await dedup.once("wh_1", action)
    assert action.calls == 0
    assert not dedup.ready
    store.available = True
    assert dedup.ready


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_in_process_store_remembers_for_the_window_only(
    results: Counter[DedupResult],
) -> None:
    clock = FakeClock()
    store = InProcessStore(window_seconds=600, max_ids=10, clock=clock)
    dedup = deduplicator(store, results)
    assert await dedup.once("wh_1", Action()) == "published"
    clock.now += 599
    assert await dedup.once("wh_1", Action()) is None
    clock.now += 2
    assert await dedup.once("wh_1", Action()) == "published"
    assert len(store) == 1


async def test_in_process_store_is_bounded_in_ids(results: Counter[DedupResult]) -> None:
    store = InProcessStore(window_seconds=600, max_ids=2, clock=FakeClock())
    dedup = deduplicator(store, results)
    for key in ("wh_1", "wh_2", "wh_3"):
        await dedup.once(key, Action())
    assert len(store) == 2
    assert await dedup.once("wh_1", Action()) == "published"  # the oldest was dropped
    assert await dedup.once("wh_3", Action()) is None


async def test_a_full_in_process_store_forgets_its_oldest_eighth_at_once() -> None:
    store = InProcessStore(window_seconds=600, max_ids=800, clock=FakeClock())
    keys = [f"wh_{number}" for number in range(2000)]
    for key in keys:
        await store.confirm(Claim(key, ClaimState.NEW))
        assert len(store) <= 800
    assert len(store) >= 700
    remembered = [(await store.claim(key)).state is ClaimState.CONFIRMED for key in keys]
    assert all(remembered[-700:])
    assert not any(remembered[:1200])


async def test_in_process_store_with_window_zero_remembers_nothing(
    results: Counter[DedupResult],
) -> None:
    store = InProcessStore(window_seconds=0, max_ids=10, clock=FakeClock())
    dedup = deduplicator(store, results)
    await dedup.once("wh_1", Action())
    assert await dedup.once("wh_1", Action()) == "published"


# --- settings ------------------------------------------------------------------------


def test_the_window_defaults_to_openais_retry_horizon_with_redis(signer: Signer) -> None:
    in_process = make_settings(signer)
    assert in_process.dedup_window_seconds == 600
    with_redis = make_settings(signer, dedup_url="redis://127.0.0.1:6379/0")
    assert with_redis.dedup_window_seconds == 73 * 3600
    chosen = make_settings(signer, dedup_url="redis://h/0", dedup_window=7200)
    assert chosen.dedup_window_seconds == 7200
    assert with_redis.dedup_claim_ttl == 2 * with_redis.publish_timeout + 1
    assert with_redis.dedup_key_prefix == f"webhook-bridge:{with_redis.exchange}:"
    assert with_redis.dedup_timeout == 0.2
    assert with_redis.dedup_on_error == "publish"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dedup_url": "http://127.0.0.1:6379"}, "BRIDGE_DEDUP_URL must be a redis://"),
        ({"dedup_url": "redis://"}, "BRIDGE_DEDUP_URL must name a host"),
        (
            {"dedup_url": "redis+sentinel://:pw@s1:26379,s2:26379"},
            r"must name the monitored master.*/service_name\[/db\]$",
        ),
        ({"dedup_url": "redis+sentinel://s1:26379/m/x"}, "and a database number"),
        ({"dedup_url": "redis+cluster://:pw@n1:7000,n2:x"}, "every node must be host:port"),
        ({"dedup_url": "redis+cluster://n1:7000/1"}, "takes seed nodes only"),
        ({"dedup_url": "redis+sentinel://s1/m?ssl=true"}, "takes no query arguments"),
        ({"dedup_url": "redis://h/0", "dedup_window": 0}, "BRIDGE_DEDUP_WINDOW must be positive"),
        ({"dedup_on_error": "ignore"}, "BRIDGE_DEDUP_ON_ERROR"),
        ({"dedup_timeout": 0}, "BRIDGE_DEDUP_TIMEOUT"),
        ({"dedup_window": 599}, r"\(599 s, BRIDGE_DEDUP_WINDOW\) must cover twice"),
        ({"timestamp_tolerance": 301}, r"\(600 s, BRIDGE_DEDUP_WINDOW\) must cover twice"),
    ],
    ids=[
        "scheme",
        "no-host",
        "sentinel-without-master",
        "sentinel-bad-db",
        "cluster-bad-port",
        "cluster-db",
        "sentinel-query",
        "zero-window",
        "mode",
        "timeout",
        "short-window",
        "long-tolerance",
    ],
)
def test_bad_dedup_settings_stop_the_process(
    signer: Signer, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(SettingsError, match=message) as refusal:
        make_settings(signer, **overrides)
    assert "pw" not in str(refusal.value)


def test_a_redis_url_without_the_redis_client_names_the_extra(
    signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def without_redis(name: str, *args: Any) -> Any:
        return None if name == "redis" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_redis)
    with pytest.raises(SettingsError, match=r"BRIDGE_DEDUP_URL .*openai-webhook-bridge\[redis\]"):
        make_settings(signer, dedup_url="redis://:password@127.0.0.1:6379/0")


def test_the_redis_password_is_redacted_and_never_in_errors(signer: Signer) -> None:
    settings = make_settings(signer, dedup_url="rediss://bridge:hunter2-x@redis.internal:6380/1")
    assert settings.dedup_url_redacted == "rediss://bridge:***@redis.internal:6380/1"
    with pytest.raises(SettingsError) as refused:
        make_settings(signer, dedup_url="https://bridge:hunter2-x@redis.internal")
    assert "hunter2" not in str(refused.value)
