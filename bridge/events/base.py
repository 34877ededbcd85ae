"""What every OpenAI webhook event shares: the envelope, open models and common payloads."""

from typing import Literal, TypeAlias

from pydantic import BaseModel, ConfigDict

__all__ = [
    "OpenModel",
    "ResourceData",
    "SipHeader",
    "SipInviteData",
    "SipMediaSecurity",
    "WebhookEventEnvelope",
]


class OpenModel(BaseModel):
    """A model that keeps the fields OpenAI adds after this package was written."""

    model_config = ConfigDict(extra="allow")


class WebhookEventEnvelope(OpenModel):
    """The fields every event carries besides its ``type`` and ``data``."""

    id: str
    """The unique ID of the event."""

    created_at: int
    """The Unix timestamp (in seconds) of when the event happened."""

    object: Literal["event"] | None = None
    """The object of the event. Always ``event``; accepted absent for every type."""


class ResourceData(OpenModel):
    """Event data naming the one object the event is about.

    A batch, eval run, fine-tuning job, model response, agent environment,
    safety alert or safety case.
    """

    id: str
    """The unique ID of the object the event is about."""


class SipHeader(OpenModel):
    """A header from the SIP INVITE."""

    name: str
    """Name of the SIP header."""

    value: str
    """Value of the SIP header."""


SipMediaSecurity: TypeAlias = Literal["rtp", "srtp"] | str
"""Media protection negotiated on the SIP leg; OpenAI may add values, so any string is kept."""


class SipInviteData(OpenModel):
    """What an incoming SIP call event tells about the INVITE."""

    sip_headers: list[SipHeader]
    """Headers from the SIP INVITE, without authorization headers, in their original order."""

    sip_media_security: SipMediaSecurity | None = None
    """``srtp`` or ``rtp`` as negotiated in SDP; omitted when unknown."""
