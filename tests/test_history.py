"""The history checker itself: what it counts, and what makes it fail."""

from __future__ import annotations

import pytest

from tests.history import Attempt, History, check


def history_of(*attempts: tuple[str, float, float, int | None]) -> History:
    history = History()
    for attempt in attempts:
        history.record(Attempt(*attempt))
    return history


def test_a_clean_history_passes_and_counts_everything() -> None:
    history = history_of(
        ("a", 0.0, 0.1, 200),
        ("b", 0.2, 2.2, 503),
        ("b", 2.5, 2.6, 202),
        ("c", 3.0, 3.1, None),
        ("c", 3.2, 3.3, 200),
    )
    verdict = check("clean", history, ["a", "b", "b", "c", "someone-else", "someone-else"])
    assert (verdict.sent, verdict.accepted, verdict.unavailable) == (3, 3, 1)
    assert verdict.connection_errors == 1
    assert verdict.duplicates == 1, "only this sender's ids are counted"
    assert verdict.longest_gap == pytest.approx(2.5)
    assert "clean: sent 3, 2xx 3, 503 1, connection errors 1, lost 0, duplicates 1" in (
        verdict.summary
    )


def test_a_2xx_that_never_arrived_is_a_loss() -> None:
    with pytest.raises(AssertionError, match="2xx'd events missing"):
        check("lost", history_of(("a", 0.0, 0.1, 200), ("b", 0.1, 0.2, 200)), ["a"])


def test_a_status_other_than_2xx_and_503_fails() -> None:
    history = history_of(("a", 0.0, 0.1, 500), ("a", 0.2, 0.3, 200))
    with pytest.raises(AssertionError, match="statuses other than 2xx and 503"):
        check("unexpected", history, ["a"])


def test_giving_up_fails_unless_the_test_abandoned_the_sender() -> None:
    history = history_of(("a", 0.0, 0.1, 200), ("b", 0.0, 0.1, 503))
    history.given_up.add("b")
    with pytest.raises(AssertionError, match="gave up"):
        check("given up", history, ["a"])
    assert check("abandoned", history, ["a"], abandoned=True).given_up == 1


def test_the_consumers_view_is_checked_the_same_way() -> None:
    # Ids a consumer's handler saw, in the order it saw them: one per delivery.
    history = history_of(("a", 0.0, 0.1, 200), ("b", 0.0, 0.1, 200))
    assert check("consumer", history, iter(["b", "a", "a"])).duplicates == 1
