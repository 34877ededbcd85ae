"""Realtime API events: ``realtime.call.incoming``."""

from typing import Literal

from bridge.events.base import SipInviteData, WebhookEventEnvelope

__all__ = ["RealtimeCallData", "RealtimeCallIncomingWebhookEvent"]


class RealtimeCallData(SipInviteData):
    """Event data of an incoming SIP call offered to the Realtime API."""

    call_id: str
    """The ``rtc_...`` ID of the pending call, to accept or reject it through the Realtime API."""


class RealtimeCallIncomingWebhookEvent(WebhookEventEnvelope):
    """Sent when an incoming SIP call is available for Realtime acceptance.

    The same pending call can also emit ``live.transport.incoming``; the first
    successful Realtime or Live accept selects the runtime.
    """

    data: RealtimeCallData
    type: Literal["realtime.call.incoming"]
