"""Batch API events: ``batch.cancelled``, ``.completed``, ``.expired``, ``.failed``."""

from typing import Literal

from bridge.events.base import ResourceData, WebhookEventEnvelope

__all__ = [
    "BatchCancelledWebhookEvent",
    "BatchCompletedWebhookEvent",
    "BatchExpiredWebhookEvent",
    "BatchFailedWebhookEvent",
]


class BatchCancelledWebhookEvent(WebhookEventEnvelope):
    """Sent when a batch API request has been cancelled."""

    data: ResourceData
    type: Literal["batch.cancelled"]


class BatchCompletedWebhookEvent(WebhookEventEnvelope):
    """Sent when a batch API request has been completed."""

    data: ResourceData
    type: Literal["batch.completed"]


class BatchExpiredWebhookEvent(WebhookEventEnvelope):
    """Sent when a batch API request has expired."""

    data: ResourceData
    type: Literal["batch.expired"]


class BatchFailedWebhookEvent(WebhookEventEnvelope):
    """Sent when a batch API request has failed."""

    data: ResourceData
    type: Literal["batch.failed"]
