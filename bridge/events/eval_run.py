"""Eval run events: ``eval.run.canceled``, ``eval.run.failed``, ``eval.run.succeeded``."""

from typing import Literal

from bridge.events.base import ResourceData, WebhookEventEnvelope

__all__ = [
    "EvalRunCanceledWebhookEvent",
    "EvalRunFailedWebhookEvent",
    "EvalRunSucceededWebhookEvent",
]


class EvalRunCanceledWebhookEvent(WebhookEventEnvelope):
    """Sent when an eval run has been canceled."""

    data: ResourceData
    type: Literal["eval.run.canceled"]


class EvalRunFailedWebhookEvent(WebhookEventEnvelope):
    """Sent when an eval run has failed."""

    data: ResourceData
    type: Literal["eval.run.failed"]


class EvalRunSucceededWebhookEvent(WebhookEventEnvelope):
    """Sent when an eval run has succeeded."""

    data: ResourceData
    type: Literal["eval.run.succeeded"]
