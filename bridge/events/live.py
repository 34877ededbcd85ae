"""Live API events: ``live.call.incoming`` (deprecated) and ``live.transport.*``."""

from typing import Literal, TypeAlias

from bridge.events.base import OpenModel, SipInviteData, WebhookEventEnvelope

__all__ = [
    "LiveCallData",
    "LiveCallIncomingWebhookEvent",
    "LiveTransportConnectedData",
    "LiveTransportConnectedWebhookEvent",
    "LiveTransportIncomingData",
    "LiveTransportIncomingWebhookEvent",
]

IncomingTransport: TypeAlias = Literal["sip"] | str
"""How a call reached OpenAI; OpenAI may add transports, so any string is kept."""

ConnectedTransport: TypeAlias = Literal["webrtc"] | str
"""How a Live session is connected; OpenAI may add transports, so any string is kept."""


class LiveCallData(SipInviteData):
    """Event data of an incoming SIP call offered to the Live API."""

    session_id: str
    """The ``live_...`` ID of the pending SIP session, for Live call controls and sideband links."""


class LiveTransportIncomingData(LiveCallData):
    """Event data of an incoming session offered to the Live API, with its transport."""

    type: IncomingTransport
    """The incoming transport: ``sip``."""


class LiveTransportConnectedData(OpenModel):
    """Event data of a Live session whose transport connected."""

    session_id: str
    """The Live session ID to attach a sideband observer with."""

    type: ConnectedTransport
    """The session transport: ``webrtc``."""


class LiveCallIncomingWebhookEvent(WebhookEventEnvelope):
    """Sent when an incoming SIP session is available for Live acceptance.

    Deprecated by OpenAI in favour of ``live.transport.incoming``, and still sent
    to existing subscriptions.
    """

    data: LiveCallData
    type: Literal["live.call.incoming"]


class LiveTransportIncomingWebhookEvent(WebhookEventEnvelope):
    """Sent when an incoming SIP session is available for Live acceptance.

    The same pending session can also emit ``realtime.call.incoming``; the first
    successful Realtime or Live accept selects the runtime.
    """

    data: LiveTransportIncomingData
    type: Literal["live.transport.incoming"]


class LiveTransportConnectedWebhookEvent(WebhookEventEnvelope):
    """Sent when a direct Live WebRTC session is created or an Instant Connect session activates."""

    data: LiveTransportConnectedData
    type: Literal["live.transport.connected"]
