"""Safety events: ``safety.alert.created``, ``safety.org_alert.created`` and safety case notices."""

from typing import Literal

from bridge.events.base import ResourceData, WebhookEventEnvelope

__all__ = [
    "SafetyAlertCreatedWebhookEvent",
    "SafetyDeactivationIssuedWebhookEvent",
    "SafetyOrgAlertCreatedWebhookEvent",
    "SafetyWarningIssuedWebhookEvent",
]


class SafetyAlertCreatedWebhookEvent(WebhookEventEnvelope):
    """Sent when an approved safety alert is available for an API project.

    ``data.id`` is the alert's ID for ``GET /v1/safety/alerts/{id}``.
    """

    data: ResourceData
    type: Literal["safety.alert.created"]


class SafetyDeactivationIssuedWebhookEvent(WebhookEventEnvelope):
    """Sent when a deactivation is issued for a safety identifier in the organization.

    ``data.id`` is the safety case's ID for ``GET /v1/safety/cases/{id}``.
    """

    data: ResourceData
    type: Literal["safety.deactivation_issued"]


class SafetyOrgAlertCreatedWebhookEvent(WebhookEventEnvelope):
    """Sent when an approved safety alert is available for an enterprise workspace.

    ``data.id`` is the alert's ID for ``GET /v1/safety/alerts/{id}``.
    """

    data: ResourceData
    type: Literal["safety.org_alert.created"]


class SafetyWarningIssuedWebhookEvent(WebhookEventEnvelope):
    """Sent when a warning is issued for a safety identifier in the organization.

    ``data.id`` is the safety case's ID for ``GET /v1/safety/cases/{id}``.
    """

    data: ResourceData
    type: Literal["safety.warning_issued"]
