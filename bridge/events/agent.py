"""Agents API events: ``agent.environment.*`` and ``agent.session.*``."""

from typing import Literal, TypeAlias

from bridge.events.base import OpenModel, ResourceData, WebhookEventEnvelope

__all__ = [
    "AgentEnvironmentExpiredWebhookEvent",
    "AgentEnvironmentFailedWebhookEvent",
    "AgentEnvironmentReadyWebhookEvent",
    "AgentEnvironmentSuspendedWebhookEvent",
    "AgentSessionActionRequiredData",
    "AgentSessionActionRequiredWebhookEvent",
    "AgentSessionConnect",
    "AgentSessionCreatedData",
    "AgentSessionCreatedWebhookEvent",
    "AgentSessionData",
    "AgentSessionFailedWebhookEvent",
    "AgentSessionIdleWebhookEvent",
    "AgentSessionInProgressWebhookEvent",
    "AgentSessionRequiredAction",
]

RequiredActionType: TypeAlias = (
    Literal[
        "computer_use_approval_request",
        "mcp_approval_request",
        "function_call",
        "environment_connection",
    ]
    | str
)
"""What a session waits for; OpenAI adds kinds of action, so any string is kept."""


class AgentEnvironmentExpiredWebhookEvent(WebhookEventEnvelope):
    """Sent when an agent environment expires and can no longer resume from a snapshot."""

    data: ResourceData
    type: Literal["agent.environment.expired"]


class AgentEnvironmentFailedWebhookEvent(WebhookEventEnvelope):
    """Sent when setup fails for a prewarmed OpenAI-hosted environment before it joins a session."""

    data: ResourceData
    type: Literal["agent.environment.failed"]


class AgentEnvironmentReadyWebhookEvent(WebhookEventEnvelope):
    """Sent when a prewarmed OpenAI-hosted environment finishes setup before joining a session."""

    data: ResourceData
    type: Literal["agent.environment.ready"]


class AgentEnvironmentSuspendedWebhookEvent(WebhookEventEnvelope):
    """Sent when an agent environment is suspended and can resume from a snapshot."""

    data: ResourceData
    type: Literal["agent.environment.suspended"]


class AgentSessionData(OpenModel):
    """Event data of an agent session that changed state."""

    id: str
    """The ID of the session."""

    environment_type: str
    """The environment type: ``none``, ``openai_hosted`` or ``self_hosted``."""

    environment_id: str | None = None
    """The ID of the environment, when one exists."""


class AgentSessionConnect(OpenModel):
    """How a self-hosted environment connects to a new session."""

    remote_url: str
    """The URL used to connect the self-hosted environment."""


class AgentSessionCreatedData(AgentSessionData):
    """Event data of a new agent session."""

    connect: AgentSessionConnect | None = None
    """Connection details, for a session with a self-hosted environment."""


class AgentSessionRequiredAction(OpenModel):
    """The kind of action a session waits for; retrieve the session for its details."""

    type: RequiredActionType


class AgentSessionActionRequiredData(OpenModel):
    """Event data of an agent session waiting for an action."""

    id: str
    """The ID of the session."""

    required_action: AgentSessionRequiredAction
    """The kind of action required; retrieve the session for its details."""


class AgentSessionActionRequiredWebhookEvent(WebhookEventEnvelope):
    """Sent when an agent session requires an action; retrieve the session for its details."""

    data: AgentSessionActionRequiredData
    type: Literal["agent.session.action_required"]


class AgentSessionCreatedWebhookEvent(WebhookEventEnvelope):
    """Sent when an agent session is created."""

    data: AgentSessionCreatedData
    type: Literal["agent.session.created"]


class AgentSessionFailedWebhookEvent(WebhookEventEnvelope):
    """Sent when an agent session fails."""

    data: AgentSessionData
    type: Literal["agent.session.failed"]


class AgentSessionIdleWebhookEvent(WebhookEventEnvelope):
    """Sent when an agent session becomes idle."""

    data: AgentSessionData
    type: Literal["agent.session.idle"]


class AgentSessionInProgressWebhookEvent(WebhookEventEnvelope):
    """Sent when an agent session enters the in-progress state."""

    data: AgentSessionData
    type: Literal["agent.session.in_progress"]
