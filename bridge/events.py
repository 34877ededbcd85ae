"""OpenAI webhook event models and the classification of raw webhook bodies.

The models mirror openai-python's ``openai.types.webhooks``: one model per event
type, tagged by a ``Literal`` ``type``, gathered in the discriminated union
``UnwrapWebhookEvent``. Every model keeps fields it does not declare, because
OpenAI adds optional fields to existing events without notice.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeAlias, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import ErrorDetails, from_json

__all__ = [
    "EVENT_MODELS",
    "EVENT_TYPE_MAX_LENGTH",
    "EVENT_TYPE_PATTERN",
    "KNOWN_EVENT_TYPES",
    "BatchCancelledWebhookEvent",
    "BatchCompletedWebhookEvent",
    "BatchExpiredWebhookEvent",
    "BatchFailedWebhookEvent",
    "Classified",
    "EvalRunCanceledWebhookEvent",
    "EvalRunFailedWebhookEvent",
    "EvalRunSucceededWebhookEvent",
    "FineTuningJobCancelledWebhookEvent",
    "FineTuningJobFailedWebhookEvent",
    "FineTuningJobSucceededWebhookEvent",
    "RealtimeCallData",
    "RealtimeCallIncomingWebhookEvent",
    "ResourceData",
    "ResponseCancelledWebhookEvent",
    "ResponseCompletedWebhookEvent",
    "ResponseFailedWebhookEvent",
    "ResponseIncompleteWebhookEvent",
    "SipHeader",
    "UnknownWebhookEvent",
    "UnwrapWebhookEvent",
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


class _OpenModel(BaseModel):
    """A model that keeps the fields OpenAI adds after this module was written."""

    model_config = ConfigDict(extra="allow")


class ResourceData(_OpenModel):
    """Event data naming the batch, eval run, fine-tuning job or model response concerned."""

    id: str
    """The unique ID of the batch, eval run, fine-tuning job or model response."""


class SipHeader(_OpenModel):
    """A header from the SIP INVITE."""

    name: str
    value: str


class RealtimeCallData(_OpenModel):
    """Event data of an incoming SIP call."""

    call_id: str
    """The unique ID of this call."""

    sip_headers: list[SipHeader]
    """Headers from the SIP INVITE."""


class _WebhookEventEnvelope(_OpenModel):
    id: str
    """The unique ID of the event."""

    created_at: int
    """The Unix timestamp (in seconds) of when the event happened."""

    object: Literal["event"] | None = None
    """The object of the event. Always ``event``."""


class BatchCancelledWebhookEvent(_WebhookEventEnvelope):
    """Sent when a batch API request has been cancelled."""

    data: ResourceData
    type: Literal["batch.cancelled"]


class BatchCompletedWebhookEvent(_WebhookEventEnvelope):
    """Sent when a batch API request has been completed."""

    data: ResourceData
    type: Literal["batch.completed"]


class BatchExpiredWebhookEvent(_WebhookEventEnvelope):
    """Sent when a batch API request has expired."""

    data: ResourceData
    type: Literal["batch.expired"]


class BatchFailedWebhookEvent(_WebhookEventEnvelope):
    """Sent when a batch API request has failed."""

    data: ResourceData
    type: Literal["batch.failed"]


class EvalRunCanceledWebhookEvent(_WebhookEventEnvelope):
    """Sent when an eval run has been canceled."""

    data: ResourceData
    type: Literal["eval.run.canceled"]


class EvalRunFailedWebhookEvent(_WebhookEventEnvelope):
    """Sent when an eval run has failed."""

    data: ResourceData
    type: Literal["eval.run.failed"]


class EvalRunSucceededWebhookEvent(_WebhookEventEnvelope):
    """Sent when an eval run has succeeded."""

    data: ResourceData
    type: Literal["eval.run.succeeded"]


class FineTuningJobCancelledWebhookEvent(_WebhookEventEnvelope):
    """Sent when a fine-tuning job has been cancelled."""

    data: ResourceData
    type: Literal["fine_tuning.job.cancelled"]


class FineTuningJobFailedWebhookEvent(_WebhookEventEnvelope):
    """Sent when a fine-tuning job has failed."""

    data: ResourceData
    type: Literal["fine_tuning.job.failed"]


class FineTuningJobSucceededWebhookEvent(_WebhookEventEnvelope):
    """Sent when a fine-tuning job has succeeded."""

    data: ResourceData
    type: Literal["fine_tuning.job.succeeded"]


class RealtimeCallIncomingWebhookEvent(_WebhookEventEnvelope):
    """Sent when the Realtime API receives an incoming SIP call."""

    data: RealtimeCallData
    type: Literal["realtime.call.incoming"]


class ResponseCancelledWebhookEvent(_WebhookEventEnvelope):
    """Sent when a background response has been cancelled."""

    data: ResourceData
    type: Literal["response.cancelled"]


class ResponseCompletedWebhookEvent(_WebhookEventEnvelope):
    """Sent when a background response has been completed."""

    data: ResourceData
    type: Literal["response.completed"]


class ResponseFailedWebhookEvent(_WebhookEventEnvelope):
    """Sent when a background response has failed."""

    data: ResourceData
    type: Literal["response.failed"]


class ResponseIncompleteWebhookEvent(_WebhookEventEnvelope):
    """Sent when a background response has been interrupted."""

    data: ResourceData
    type: Literal["response.incomplete"]


UnwrapWebhookEvent: TypeAlias = Annotated[
    BatchCancelledWebhookEvent
    | BatchCompletedWebhookEvent
    | BatchExpiredWebhookEvent
    | BatchFailedWebhookEvent
    | EvalRunCanceledWebhookEvent
    | EvalRunFailedWebhookEvent
    | EvalRunSucceededWebhookEvent
    | FineTuningJobCancelledWebhookEvent
    | FineTuningJobFailedWebhookEvent
    | FineTuningJobSucceededWebhookEvent
    | RealtimeCallIncomingWebhookEvent
    | ResponseCancelledWebhookEvent
    | ResponseCompletedWebhookEvent
    | ResponseFailedWebhookEvent
    | ResponseIncompleteWebhookEvent,
    Field(discriminator="type"),
]


class UnknownWebhookEvent(_OpenModel):
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


def _event_type_of(model: type[BaseModel]) -> str:
    (event_type,) = get_args(model.model_fields["type"].annotation)
    return str(event_type)


def _union_members(union_alias: object) -> tuple[type[BaseModel], ...]:
    union, *_metadata = get_args(union_alias)
    return get_args(union)


EVENT_MODELS: Mapping[str, type[BaseModel]] = MappingProxyType(
    {_event_type_of(model): model for model in _union_members(UnwrapWebhookEvent)}
)
KNOWN_EVENT_TYPES: frozenset[str] = frozenset(EVENT_MODELS)


@dataclass(frozen=True, slots=True)
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
