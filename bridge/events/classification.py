"""Classifying raw, verified webhook bodies: known, unknown or malformed.

The routing decision for every authentic body is made here, from the exact bytes:
a known type that validates against its model, an unknown type with a usable
envelope (forwarded so consumers see types OpenAI adds later), or a malformed
body (quarantined with a reason that never echoes body content).
"""

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import StrictInt, StringConstraints, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails, from_json

from bridge.events.base import OpenModel
from bridge.events.union import EVENT_MODELS, UnwrapWebhookEvent

__all__ = [
    "EVENT_TYPE_MAX_LENGTH",
    "EVENT_TYPE_PATTERN",
    "Classified",
    "UnknownWebhookEvent",
    "classify",
    "parse_event",
    "unknown_event_adapter",
    "webhook_event_adapter",
]

EVENT_TYPE_PATTERN = r"^[a-z0-9_]+(\.[a-z0-9_]+)+$"
"""Dotted lowercase words: usable as an AMQP topic routing key, never a ``*``/``#`` wildcard."""

EVENT_TYPE_MAX_LENGTH = 255
"""AMQP caps a routing key at 255 bytes; the pattern admits ASCII only, so characters are bytes."""

_REASON_MAX_LENGTH = 200


class UnknownWebhookEvent(OpenModel):
    """The envelope of an event type this bridge does not model (yet).

    Stricter than the known models: the type becomes a routing key, so it must
    be a plain dotted name, and nothing is coerced.
    """

    id: Annotated[str, StringConstraints(min_length=1)]
    created_at: StrictInt
    data: dict[str, Any]
    type: Annotated[
        str, StringConstraints(pattern=EVENT_TYPE_PATTERN, max_length=EVENT_TYPE_MAX_LENGTH)
    ]
    object: str | None = None


webhook_event_adapter: TypeAdapter[UnwrapWebhookEvent] = TypeAdapter(UnwrapWebhookEvent)
unknown_event_adapter: TypeAdapter[UnknownWebhookEvent] = TypeAdapter(UnknownWebhookEvent)


@dataclass(slots=True)  # built per request: a frozen one costs five times as much
class Classified:
    """What a verified webhook body turned out to be, and where it should be routed."""

    kind: Literal["known", "unknown", "malformed"]
    event_type: str | None
    """The routing key for known and unknown events; for malformed ones, a readable type name."""
    created_at: int | None
    reason: str | None
    """Why a malformed body was rejected; names no body content except the event type."""


def classify(body: bytes) -> Classified:
    """Classify raw, already verified webhook bytes; never raises."""
    try:
        event = webhook_event_adapter.validate_json(body)
    except ValidationError as error:
        return _classify_rejected(body, error)
    return Classified(kind="known", event_type=event.type, created_at=event.created_at, reason=None)


def parse_event(body: bytes) -> UnwrapWebhookEvent | UnknownWebhookEvent:
    """Parse raw webhook bytes into a typed event; raises ``ValidationError`` when malformed."""
    try:
        return webhook_event_adapter.validate_json(body)
    except ValidationError as error:
        if _first_error_type(error) != "union_tag_invalid":
            raise
    return unknown_event_adapter.validate_json(body)


def _first_error_type(error: ValidationError) -> str:
    return error.errors(include_url=False, include_context=False, include_input=False)[0]["type"]


def _classify_rejected(body: bytes, error: ValidationError) -> Classified:
    errors = error.errors(include_url=False, include_context=False, include_input=False)
    if errors[0]["type"] == "json_invalid":
        return _malformed("body is not valid JSON")
    try:
        document = from_json(body)
    except ValueError:
        return _malformed("body is not valid JSON")
    if not isinstance(document, dict):
        return _malformed("body is not a JSON object")

    event_type = document.get("type")
    created_at = _readable_timestamp(document.get("created_at"))
    if isinstance(event_type, str) and event_type in EVENT_MODELS:
        # The union prefixes each location with the matched tag; the event type leads the reason.
        details = _describe(errors, skip_leading=1)
        return _malformed(
            f"{event_type} failed schema validation: {details}",
            event_type=event_type,
            created_at=created_at,
        )

    try:
        unknown = unknown_event_adapter.validate_python(document)
    except ValidationError as envelope_error:
        envelope_errors = envelope_error.errors(
            include_url=False, include_context=False, include_input=False
        )
        if any(detail["loc"][:1] == ("type",) for detail in envelope_errors):
            return _malformed("missing or unusable event type", created_at=created_at)
        details = _describe(envelope_errors, skip_leading=0)
        return _malformed(
            f"{event_type} failed envelope validation: {details}",
            event_type=str(event_type),
            created_at=created_at,
        )
    return Classified(
        kind="unknown", event_type=unknown.type, created_at=unknown.created_at, reason=None
    )


def _readable_timestamp(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _describe(errors: list[ErrorDetails], *, skip_leading: int) -> str:
    # Built from locations and messages only, so no input value reaches a log line.
    parts = []
    for detail in errors:
        location = ".".join(str(part) for part in detail["loc"][skip_leading:])
        parts.append(f"{location}: {detail['msg']}" if location else detail["msg"])
    return "; ".join(parts)


def _malformed(
    reason: str, *, event_type: str | None = None, created_at: int | None = None
) -> Classified:
    if len(reason) > _REASON_MAX_LENGTH:
        reason = reason[: _REASON_MAX_LENGTH - 3] + "..."
    return Classified(kind="malformed", event_type=event_type, created_at=created_at, reason=reason)
