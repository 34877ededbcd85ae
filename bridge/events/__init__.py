"""OpenAI webhook event models and the classification of raw webhook bodies.

The models mirror openai-python's ``openai.types.webhooks``: one model per event
type, tagged by a ``Literal`` ``type`` and named as the SDK names it, gathered in
the discriminated union ``UnwrapWebhookEvent``. One module per family of types
(``batch``, ``eval_run``, ``fine_tuning``, ``response``, ``realtime``, ``live``,
``agent``, ``safety``); ``base`` holds what they share, ``union`` the union and
``classification`` the routing decision. Every model keeps fields it does not
declare, because OpenAI adds optional fields to existing events without notice.
"""

from bridge.events.agent import (
    AgentEnvironmentExpiredWebhookEvent,
    AgentEnvironmentFailedWebhookEvent,
    AgentEnvironmentReadyWebhookEvent,
    AgentEnvironmentSuspendedWebhookEvent,
    AgentSessionActionRequiredData,
    AgentSessionActionRequiredWebhookEvent,
    AgentSessionConnect,
    AgentSessionCreatedData,
    AgentSessionCreatedWebhookEvent,
    AgentSessionData,
    AgentSessionFailedWebhookEvent,
    AgentSessionIdleWebhookEvent,
    AgentSessionInProgressWebhookEvent,
    AgentSessionRequiredAction,
)
from bridge.events.base import ResourceData, SipHeader, SipInviteData, SipMediaSecurity
from bridge.events.batch import (
    BatchCancelledWebhookEvent,
    BatchCompletedWebhookEvent,
    BatchExpiredWebhookEvent,
    BatchFailedWebhookEvent,
)
from bridge.events.classification import (
    EVENT_TYPE_MAX_LENGTH,
    EVENT_TYPE_PATTERN,
    Classified,
    UnknownWebhookEvent,
    classify,
    parse_event,
    unknown_event_adapter,
    webhook_event_adapter,
)
from bridge.events.eval_run import (
    EvalRunCanceledWebhookEvent,
    EvalRunFailedWebhookEvent,
    EvalRunSucceededWebhookEvent,
)
from bridge.events.fine_tuning import (
    FineTuningJobCancelledWebhookEvent,
    FineTuningJobFailedWebhookEvent,
    FineTuningJobSucceededWebhookEvent,
)
from bridge.events.live import (
    LiveCallData,
    LiveCallIncomingWebhookEvent,
    LiveTransportConnectedData,
    LiveTransportConnectedWebhookEvent,
    LiveTransportIncomingData,
    LiveTransportIncomingWebhookEvent,
)
from bridge.events.realtime import RealtimeCallData, RealtimeCallIncomingWebhookEvent
from bridge.events.response import (
    ResponseCancelledWebhookEvent,
    ResponseCompletedWebhookEvent,
    ResponseFailedWebhookEvent,
    ResponseIncompleteWebhookEvent,
)
from bridge.events.safety import (
    SafetyAlertCreatedWebhookEvent,
    SafetyDeactivationIssuedWebhookEvent,
    SafetyOrgAlertCreatedWebhookEvent,
    SafetyWarningIssuedWebhookEvent,
)
from bridge.events.union import EVENT_MODELS, KNOWN_EVENT_TYPES, UnwrapWebhookEvent

__all__ = [
    "EVENT_MODELS",
    "EVENT_TYPE_MAX_LENGTH",
    "EVENT_TYPE_PATTERN",
    "KNOWN_EVENT_TYPES",
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
    "LiveCallData",
    "LiveCallIncomingWebhookEvent",
    "LiveTransportConnectedData",
    "LiveTransportConnectedWebhookEvent",
    "LiveTransportIncomingData",
    "LiveTransportIncomingWebhookEvent",
    "RealtimeCallData",
    "RealtimeCallIncomingWebhookEvent",
    "ResourceData",
    "ResponseCancelledWebhookEvent",
    "ResponseCompletedWebhookEvent",
    "ResponseFailedWebhookEvent",
    "ResponseIncompleteWebhookEvent",
    "SafetyAlertCreatedWebhookEvent",
    "SafetyDeactivationIssuedWebhookEvent",
    "SafetyOrgAlertCreatedWebhookEvent",
    "SafetyWarningIssuedWebhookEvent",
    "SipHeader",
    "SipInviteData",
    "SipMediaSecurity",
    "UnknownWebhookEvent",
    "UnwrapWebhookEvent",
    "classify",
    "parse_event",
    "unknown_event_adapter",
    "webhook_event_adapter",
]
