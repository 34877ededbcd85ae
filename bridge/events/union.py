"""The discriminated union of every modelled event type, and the tables derived from it."""

from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, TypeAlias, get_args

from pydantic import BaseModel, Field

from bridge.events.agent import (
    AgentEnvironmentExpiredWebhookEvent,
    AgentEnvironmentFailedWebhookEvent,
    AgentEnvironmentReadyWebhookEvent,
    AgentEnvironmentSuspendedWebhookEvent,
    AgentSessionActionRequiredWebhookEvent,
    AgentSessionCreatedWebhookEvent,
    AgentSessionFailedWebhookEvent,
    AgentSessionIdleWebhookEvent,
    AgentSessionInProgressWebhookEvent,
)
from bridge.events.batch import (
    BatchCancelledWebhookEvent,
    BatchCompletedWebhookEvent,
    BatchExpiredWebhookEvent,
    BatchFailedWebhookEvent,
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
    LiveCallIncomingWebhookEvent,
    LiveTransportConnectedWebhookEvent,
    LiveTransportIncomingWebhookEvent,
)
from bridge.events.realtime import RealtimeCallIncomingWebhookEvent
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

__all__ = [
    "EVENT_MODELS",
    "KNOWN_EVENT_TYPES",
    "UnwrapWebhookEvent",
    "event_type_of",
    "union_members",
]

UnwrapWebhookEvent: TypeAlias = Annotated[
    AgentEnvironmentExpiredWebhookEvent
    | AgentEnvironmentFailedWebhookEvent
    | AgentEnvironmentReadyWebhookEvent
    | AgentEnvironmentSuspendedWebhookEvent
    | AgentSessionActionRequiredWebhookEvent
    | AgentSessionCreatedWebhookEvent
    | AgentSessionFailedWebhookEvent
    | AgentSessionIdleWebhookEvent
    | AgentSessionInProgressWebhookEvent
    | BatchCancelledWebhookEvent
    | BatchCompletedWebhookEvent
    | BatchExpiredWebhookEvent
    | BatchFailedWebhookEvent
    | EvalRunCanceledWebhookEvent
    | EvalRunFailedWebhookEvent
    | EvalRunSucceededWebhookEvent
    | FineTuningJobCancelledWebhookEvent
    | FineTuningJobFailedWebhookEvent
    | FineTuningJobSucceededWebhookEvent
    | LiveCallIncomingWebhookEvent
    | LiveTransportConnectedWebhookEvent
    | LiveTransportIncomingWebhookEvent
    | RealtimeCallIncomingWebhookEvent
    | ResponseCancelledWebhookEvent
    | ResponseCompletedWebhookEvent
    | ResponseFailedWebhookEvent
    | ResponseIncompleteWebhookEvent
    | SafetyAlertCreatedWebhookEvent
    | SafetyDeactivationIssuedWebhookEvent
    | SafetyOrgAlertCreatedWebhookEvent
    | SafetyWarningIssuedWebhookEvent,
    Field(discriminator="type"),
]
"""Every event type this package models, told apart by its ``type``."""


def event_type_of(model: type[BaseModel]) -> str:
    """The ``type`` an event model is tagged with (its ``Literal``)."""
    (event_type,) = get_args(model.model_fields["type"].annotation)
    return str(event_type)


def union_members(union_alias: object) -> tuple[type[BaseModel], ...]:
    """The models of an ``Annotated`` union such as ``UnwrapWebhookEvent`` (or the SDK's)."""
    union, *_metadata = get_args(union_alias)
    return get_args(union)


EVENT_MODELS: Mapping[str, type[BaseModel]] = MappingProxyType(
    {event_type_of(model): model for model in union_members(UnwrapWebhookEvent)}
)
"""The model of each known event type, by type."""

KNOWN_EVENT_TYPES: frozenset[str] = frozenset(EVENT_MODELS)
