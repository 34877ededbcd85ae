"""The parts of ``replay`` that need no broker: topic patterns, WHEN values, the per-message
decision (verification, classification, routing and the properties of the copy)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from aio_pika import IncomingMessage
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from bridge.cli.replay import _ProgressBar
from bridge.publisher import (
    QUARANTINE_REASON_HEADER,
    VALIDATED_HEADER,
    ArchiveRetention,
    Topology,
)
from bridge.replay import REPLAYED_AT_HEADER, REPLAYED_FROM_HEADER, Filters, Result, Target
from bridge.replay.decision import Decider, replay_decider
from bridge.replay.when import parse_when
from bridge.samples import sample_body
from bridge.topic import topic_matches
from tests.conftest import Signer

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
TOPOLOGY = Topology("hooks", "hooks.unrouted", "hooks.quarantine")


@pytest.mark.parametrize(
    ("pattern", "routing_key", "matches"),
    [
        ("#", "batch.completed", True),
        ("batch.*", "batch.completed", True),
        ("batch.*", "batch", False),
        ("*.failed", "eval.run.failed", False),
        ("#.failed", "eval.run.failed", True),
        ("#.failed", "failed", True),
        ("fine_tuning.#", "fine_tuning.job.succeeded", True),
        ("fine_tuning.#", "fine_tuning", True),
        ("eval.run.*", "eval.run.canceled", True),
        ("eval.*.canceled", "eval.run.canceled", True),
        ("batch.completed", "batch.completed", True),
        ("batch.completed", "batch.completedx", False),
        ("#.job.#", "fine_tuning.job.failed", True),
        ("*", "batch.completed", False),
    ],
)
def test_topic_patterns_match_as_rabbitmq_binds(
    pattern: str, routing_key: str, matches: bool
) -> None:
    assert topic_matches(pattern, routing_key) is matches


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10m", NOW - timedelta(minutes=10)),
        ("2h", NOW - timedelta(hours=2)),
        ("7d", NOW - timedelta(days=7)),
        ("1w", NOW - timedelta(weeks=1)),
        ("30s", NOW - timedelta(seconds=30)),
        ("2026-05-31T08:00:00Z", datetime(2026, 5, 31, 8, tzinfo=UTC)),
        ("2026-05-31T10:00:00+02:00", datetime(2026, 5, 31, 8, tzinfo=UTC)),
        ("2026-05-31 08:00", datetime(2026, 5, 31, 8, tzinfo=UTC)),
    ],
)
def test_when_is_a_duration_back_or_an_iso_time(text: str, expected: datetime) -> None:
    assert parse_when(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "10", "ten minutes", "-5m", "5y", "yesterday"])
def test_a_bad_when_is_a_readable_error(text: str) -> None:
    with pytest.raises(ValueError, match="duration such as 10m"):
        parse_when(text, NOW)


def stored(
    body: bytes,
    headers: dict[str, object],
    *,
    message_id: str | None,
    timestamp: datetime | None = NOW,
) -> IncomingMessage:
    """A message as the broker hands it out of a queue."""
    properties = Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        headers=headers,  # type: ignore[arg-type]
        message_id=message_id,
        timestamp=timestamp,
        message_type="batch.completed",
        app_id="openai-webhook-bridge",
        priority=3,
        correlation_id="corr-1",
        expiration="60000",
    )
    delivered = DeliveredMessage(
        delivery=Basic.GetOk(delivery_tag=1, exchange="hooks", routing_key="batch.completed"),
        header=ContentHeader(properties=properties, body_size=len(body)),
        body=body,
        channel=None,  # type: ignore[arg-type]
    )
    return IncomingMessage(delivered, no_ack=True)


def signed(signer: Signer, body: bytes, **extra: object) -> IncomingMessage:
    headers = signer.headers(body)
    del headers["content-type"]
    return stored(body, {**headers, **extra}, message_id=headers["webhook-id"])


def decider(
    signer: Signer,
    *,
    filters: Filters | None = None,
    target: Target | None = None,
    keeps_malformed: bool = False,
    topology: Topology = TOPOLOGY,
) -> Decider:
    return replay_decider(
        secrets=[signer.secret],
        topology=topology,
        filters=filters or Filters(),
        target=target or Target(),
        source_queue="hooks.unrouted",
        keeps_malformed=keeps_malformed,
    )


def test_the_copy_keeps_every_property_and_header_and_adds_the_marks(signer: Signer) -> None:
    body = sample_body("batch.completed")
    message = signed(signer, body, traceparent="00-abc-def-01", **{VALIDATED_HEADER: False})
    decision = decider(signer).decide(message, "2026-06-01T12:00:00.000001+00:00")

    assert decision.result is Result.REPLAYED
    assert decision.publish is not None
    assert (decision.publish.exchange, decision.publish.routing_key) == (
        "hooks",
        "batch.completed",
    )
    copy = decision.publish.message
    assert copy.body == body
    for name in ("message_id", "content_type", "delivery_mode", "timestamp", "type", "app_id"):
        assert getattr(copy, name) == getattr(message, name), name
    assert (copy.priority, copy.correlation_id, copy.expiration) == (3, "corr-1", 60.0)
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature", "traceparent"):
        assert copy.headers[name] == message.headers[name], name
    assert copy.headers[VALIDATED_HEADER] is True  # re-classified with the current models
    assert copy.headers[REPLAYED_FROM_HEADER] == "hooks.unrouted"
    assert copy.headers[REPLAYED_AT_HEADER] == "2026-06-01T12:00:00.000001+00:00"


def test_with_the_archive_on_a_replay_still_goes_to_the_main_exchange(signer: Signer) -> None:
    archived = dataclasses.replace(TOPOLOGY, archive=ArchiveRetention("7D"))
    message = signed(signer, sample_body("batch.completed"))
    decision = decider(signer, topology=archived).decide(message, "now")
    assert decision.publish is not None
    assert decision.publish.exchange == "hooks"


def test_to_queue_and_to_exchange(signer: Signer) -> None:
    message = signed(signer, sample_body("batch.completed"))
    to_queue = decider(signer, target=Target(queue="billing")).decide(message, "now")
    assert to_queue.publish is not None
    assert (to_queue.publish.exchange, to_queue.publish.routing_key) == ("", "billing")
    to_exchange = decider(signer, target=Target(exchange="other")).decide(message, "now")
    assert to_exchange.publish is not None
    assert (to_exchange.publish.exchange, to_exchange.publish.routing_key) == (
        "other",
        "batch.completed",
    )
    with pytest.raises(ValueError, match="exclude each other"):
        Target(queue="a", exchange="b")


def test_unverifiable_messages_are_never_published(signer: Signer) -> None:
    body = sample_body("batch.completed")
    forged = signed(Signer(), body)
    no_headers = stored(body, {}, message_id="wh_1")
    genuine = signed(signer, body)
    other_id = stored(body, dict(genuine.headers), message_id="wh_not_the_signed_one")
    for message in (forged, no_headers, other_id):
        decision = decider(signer).decide(message, "now")
        assert decision.result is Result.UNVERIFIABLE
        assert decision.publish is None
        assert "whsec_" not in decision.reason


def test_an_old_timestamp_still_verifies(signer: Signer) -> None:
    body = sample_body("batch.completed")
    headers = signer.headers(body, timestamp=1_000_000_000)  # 2001
    message = stored(body, dict(headers), message_id=headers["webhook-id"])
    assert decider(signer).decide(message, "now").result is Result.REPLAYED


def test_malformed_goes_to_the_quarantine_queue_or_stays(signer: Signer) -> None:
    message = signed(signer, b"[1, 2, 3]", **{VALIDATED_HEADER: True})
    decision = decider(signer).decide(message, "now")
    assert decision.result is Result.MALFORMED
    assert decision.publish is not None
    assert (decision.publish.exchange, decision.publish.routing_key) == ("", "hooks.quarantine")
    headers = decision.publish.message.headers
    assert VALIDATED_HEADER not in headers
    assert headers[QUARANTINE_REASON_HEADER]

    kept = decider(signer, keeps_malformed=True).decide(message, "now")
    assert (kept.result, kept.publish) == (Result.MALFORMED, None)


def test_filters_on_type_and_time(signer: Signer) -> None:
    message = signed(signer, sample_body("batch.completed"))
    window = Filters(since=NOW - timedelta(minutes=1), until=NOW + timedelta(minutes=1))
    assert decider(signer, filters=window).decide(message, "now").result is Result.REPLAYED
    later = Filters(since=NOW + timedelta(seconds=1))
    assert decider(signer, filters=later).decide(message, "now").result is Result.FILTERED
    earlier = Filters(until=NOW - timedelta(seconds=1))
    assert decider(signer, filters=earlier).decide(message, "now").result is Result.FILTERED
    other_type = Filters(types=("response.*", "#.failed"))
    assert decider(signer, filters=other_type).decide(message, "now").result is Result.FILTERED
    batches = Filters(types=("response.*", "batch.*"))
    assert decider(signer, filters=batches).decide(message, "now").result is Result.REPLAYED
    untimed = stored(message.body, dict(message.headers), message_id="x", timestamp=None)
    assert decider(signer, filters=window).decide(untimed, "now").result is Result.FILTERED


def test_the_progress_bar_rewrites_one_line_and_clears_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bar = _ProgressBar()
    bar(5, 10)
    bar(6, 10)  # within a tenth of a second: not redrawn
    bar.finish()
    assert capsys.readouterr().err == f"\r[{'#' * 15}{'.' * 15}] 5/10\r\033[K"
