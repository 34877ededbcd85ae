"""Background response events: ``response.*`` (cancelled, completed, failed, incomplete)."""

from typing import Literal

from bridge.events.base import ResourceData, WebhookEventEnvelope

__all__ = [
    "ResponseCancelledWebhookEvent",
    "ResponseCompletedWebhookEvent",
    "ResponseFailedWebhookEvent",
    "ResponseIncompleteWebhookEvent",
]


class ResponseCancelledWebhookEvent(WebhookEventEnvelope):
    """Sent when a background response has been cancelled."""

    data: ResourceData
    type: Literal["response.cancelled"]


class ResponseCompletedWebhookEvent(WebhookEventEnvelope):
    """Sent when a background response has been completed."""

    data: ResourceData
    type: Literal["response.completed"]


class ResponseFailedWebhookEvent(WebhookEventEnvelope):
    """Sent when a background response has failed."""

    data: ResourceData
    type: Literal["response.failed"]


class ResponseIncompleteWebhookEvent(WebhookEventEnvelope):
    """Sent when a background response has been interrupted."""

    data: ResourceData
    type: Literal["response.incomplete"]
