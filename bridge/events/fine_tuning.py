"""Fine-tuning job events: ``fine_tuning.job.cancelled``, ``.failed``, ``.succeeded``."""

from typing import Literal

from bridge.events.base import ResourceData, WebhookEventEnvelope

__all__ = [
    "FineTuningJobCancelledWebhookEvent",
    "FineTuningJobFailedWebhookEvent",
    "FineTuningJobSucceededWebhookEvent",
]


class FineTuningJobCancelledWebhookEvent(WebhookEventEnvelope):
    """Sent when a fine-tuning job has been cancelled."""

    data: ResourceData
    type: Literal["fine_tuning.job.cancelled"]


class FineTuningJobFailedWebhookEvent(WebhookEventEnvelope):
    """Sent when a fine-tuning job has failed."""

    data: ResourceData
    type: Literal["fine_tuning.job.failed"]


class FineTuningJobSucceededWebhookEvent(WebhookEventEnvelope):
    """Sent when a fine-tuning job has succeeded."""

    data: ResourceData
    type: Literal["fine_tuning.job.succeeded"]
