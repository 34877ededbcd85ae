"""Rejected-request log lines within a rate: the token bucket and its summaries, on a fake clock."""

from __future__ import annotations

import logging

import pytest

from bridge.app import (
    REJECTION_LOG_BURST,
    REJECTION_LOG_RATE,
    SUPPRESSED_SUMMARY_SECONDS,
    rejection_log,
)
from bridge.logs import RateLimitedLog
from bridge.metrics import RequestOutcome

UNAUTHORIZED = RequestOutcome.UNAUTHORIZED
TOO_LARGE = RequestOutcome.TOO_LARGE


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def suppressed() -> list[RequestOutcome]:
    return []


@pytest.fixture
def rejections(
    clock: FakeClock, suppressed: list[RequestOutcome]
) -> RateLimitedLog[RequestOutcome]:
    """Configured as the app configures it."""
    return rejection_log(suppressed.append, log=logging.getLogger("tests.rejections"), clock=clock)


def allowed(rejections: RateLimitedLog[RequestOutcome], kind: RequestOutcome, times: int) -> int:
    return sum(rejections.allow(kind) for _ in range(times))


def test_the_chosen_rate_and_burst() -> None:
    assert (REJECTION_LOG_RATE, REJECTION_LOG_BURST, SUPPRESSED_SUMMARY_SECONDS) == (10, 20, 10)


def test_a_burst_then_the_rate(
    rejections: RateLimitedLog[RequestOutcome],
    clock: FakeClock,
    suppressed: list[RequestOutcome],
) -> None:
    assert allowed(rejections, UNAUTHORIZED, 1000) == 20
    assert suppressed == [UNAUTHORIZED] * 980
    clock.now += 0.05
    assert not rejections.allow(UNAUTHORIZED), "half a line's worth of time"
    clock.now += 0.06
    assert rejections.allow(UNAUTHORIZED)
    assert not rejections.allow(UNAUTHORIZED)
    # A steady flood for 10 s (a request every 1/64 s) gets 10 lines a second through.
    logged = 0
    for _ in range(640):
        clock.now += 1 / 64
        logged += rejections.allow(UNAUTHORIZED)
    assert logged == 100
    # A quiet hour refills the bucket to the burst, not beyond.
    clock.now += 3600
    assert allowed(rejections, UNAUTHORIZED, 1000) == 20


def test_each_outcome_has_its_own_bucket(
    rejections: RateLimitedLog[RequestOutcome], suppressed: list[RequestOutcome]
) -> None:
    assert allowed(rejections, UNAUTHORIZED, 100) == 20
    assert allowed(rejections, TOO_LARGE, 5) == 5, "a flood of 401s does not hide a 413"
    assert set(suppressed) == {UNAUTHORIZED}


def test_one_summary_per_outcome_when_lines_were_suppressed(
    rejections: RateLimitedLog[RequestOutcome],
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tests.rejections")
    rejections.report_suppressed()
    assert allowed(rejections, TOO_LARGE, 20) == 20
    rejections.report_suppressed()
    assert caplog.records == [], "nothing suppressed, nothing to say"

    assert allowed(rejections, UNAUTHORIZED, 1254) == 20
    clock.now += 9.5
    rejections.report_suppressed()
    assert caplog.records == [], "not due before 10 s"
    clock.now += 0.5
    rejections.report_suppressed()
    (summary,) = caplog.records
    assert summary.levelno == logging.WARNING
    assert summary.getMessage() == (
        "suppressed 1234 rejected-request log lines (unauthorized) in the last 10 s"
    )
    assert summary.__dict__["outcome"] == "unauthorized"
    assert summary.__dict__["suppressed"] == 1234
    rejections.report_suppressed()
    assert len(caplog.records) == 1, "counted once"

    # The next window starts with the next line suppressed, and shutdown reports it early.
    clock.now += 60
    assert allowed(rejections, UNAUTHORIZED, 27) == 20
    clock.now += 2
    rejections.report_suppressed()
    assert len(caplog.records) == 1
    rejections.report_suppressed(due_only=False)
    assert caplog.records[-1].getMessage() == (
        "suppressed 7 rejected-request log lines (unauthorized) in the last 2 s"
    )
