"""What a replay does with one stored message, decided from its bytes and headers alone.

The same checks as the ingress, against the current configuration: the stored
``webhook-id``/``webhook-timestamp``/``webhook-signature`` headers are verified again
(without the timestamp window: stored events are old), the exact body is classified
again with the current models, and the routing policy picks the routing key.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, HeadersType

from bridge.archive import STREAM_OFFSET_HEADER
from bridge.consumer import (
    PerSourceVerifier,
    VerifySecrets,
    message_source,
    signature_problem,
    stored_message_verifier,
)
from bridge.events import classify
from bridge.publisher import QUARANTINE_REASON_HEADER, VALIDATED_HEADER, Topology, route
from bridge.signature import InvalidSecretError, SignatureVerifier, WebhookHeaders
from bridge.topic import any_topic_matches

REPLAYED_FROM_HEADER = "x-replayed-from"
REPLAYED_AT_HEADER = "x-replayed-at"
# Headers a replay sets afresh; every other header travels unchanged.
_RESET_HEADERS = frozenset(
    {
        VALIDATED_HEADER,
        QUARANTINE_REASON_HEADER,
        STREAM_OFFSET_HEADER,
        REPLAYED_FROM_HEADER,
        REPLAYED_AT_HEADER,
    }
)


class Result(enum.StrEnum):
    """What became of one message (the ``result`` label of the replay counter)."""

    REPLAYED = "replayed"
    MALFORMED = "malformed"
    UNVERIFIABLE = "unverifiable"
    FILTERED = "filtered"
    LEFT = "left"


@dataclass(frozen=True, slots=True)
class Filters:
    """``--type`` patterns, the ``--since``/``--until`` window on the message timestamp, and
    ``--source``: the ``x-webhook-source`` header."""

    types: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    source: str | None = None

    def admits_source(self, message: AbstractIncomingMessage) -> bool:
        return self.source is None or message_source(message) == self.source

    def admits_time(self, moment: datetime | None) -> bool:
        if self.since is None and self.until is None:
            return True
        if moment is None:
            return False
        return (self.since is None or moment >= self.since) and (
            self.until is None or moment <= self.until
        )

    def admits_type(self, event_type: str | None) -> bool:
        if not self.types:
            return True
        return event_type is not None and any_topic_matches(self.types, event_type)


@dataclass(frozen=True, slots=True)
class Target:
    """Where replayed events go: one queue, one exchange, or (neither) the main exchange."""

    queue: str | None = None
    exchange: str | None = None

    def __post_init__(self) -> None:
        if self.queue is not None and self.exchange is not None:
            raise ValueError("--to-queue and --to-exchange exclude each other")


@dataclass(frozen=True, slots=True)
class Publish:
    exchange: str
    routing_key: str
    message: aio_pika.Message


@dataclass(frozen=True, slots=True)
class Decision:
    result: Result
    publish: Publish | None = None
    """``None``: the message stays in its source."""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Decider:
    """Decides for each message of one source. ``keeps_malformed``: the source is where
    malformed events belong (the quarantine, or the archive that also holds them)."""

    verifier: SignatureVerifier | PerSourceVerifier
    topology: Topology
    filters: Filters
    target: Target
    source_queue: str
    keeps_malformed: bool

    def decide(self, message: AbstractIncomingMessage, replayed_at: str) -> Decision:
        if not self.filters.admits_time(message.timestamp):
            return Decision(Result.FILTERED, reason="outside --since/--until")
        if not self.filters.admits_source(message):
            return Decision(Result.FILTERED, reason="source not the one of --source")
        event = classify(message.body)
        if not self.filters.admits_type(event.event_type):
            return Decision(Result.FILTERED, reason="type not matched by --type")
        problem = signature_problem(self.verifier, message)
        if problem is not None:
            return Decision(Result.UNVERIFIABLE, reason=problem)
        stored = message.headers
        webhook_headers = WebhookHeaders(
            str(stored["webhook-id"]),
            str(stored["webhook-timestamp"]),
            str(stored["webhook-signature"]),
        )
        routed = route(self.topology, webhook_headers, message.body, event)
        headers: HeadersType = {
            name: value for name, value in stored.items() if name not in _RESET_HEADERS
        }
        for name in (VALIDATED_HEADER, QUARANTINE_REASON_HEADER):
            if name in routed.properties.headers:
                headers[name] = routed.properties.headers[name]
        headers[REPLAYED_FROM_HEADER] = self.source_queue
        headers[REPLAYED_AT_HEADER] = replayed_at
        copy = _same_message(message, headers)
        if event.kind == "malformed":
            reason = event.reason or "malformed"
            if self.keeps_malformed:
                return Decision(Result.MALFORMED, reason=reason)
            # Straight into the quarantine queue: through its exchange, the archive
            # (bound there) would take a second copy of an event it already holds.
            quarantine = Publish("", self.topology.quarantine_exchange, copy)
            return Decision(Result.MALFORMED, quarantine, reason)
        if self.target.queue is not None:
            return Decision(Result.REPLAYED, Publish("", self.target.queue, copy))
        # The main exchange itself, not the archive's ingress: the archive has the event.
        exchange = self.target.exchange or self.topology.exchange
        return Decision(Result.REPLAYED, Publish(exchange, routed.routing_key, copy))


def _same_message(message: AbstractIncomingMessage, headers: HeadersType) -> aio_pika.Message:
    """The stored message with new headers and every other property unchanged."""
    return aio_pika.Message(
        body=message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=message.delivery_mode,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        expiration=message.expiration,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        user_id=message.user_id,
        app_id=message.app_id,
    )


def replay_decider(
    *,
    secrets: VerifySecrets,
    topology: Topology,
    filters: Filters,
    target: Target,
    source_queue: str,
    keeps_malformed: bool,
) -> Decider:
    """A decider verifying with ``secrets`` and no timestamp window (stored events are
    legitimately old; the ingress enforced the window on arrival). Raises
    ``InvalidSecretError`` for a secret that cannot be used."""
    verifier = stored_message_verifier(secrets)
    if verifier is None:
        raise InvalidSecretError("no webhook secret to verify with")
    return Decider(verifier, topology, filters, target, source_queue, keeps_malformed)
