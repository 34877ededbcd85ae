"""The event models held to openai-python's (a test dependency only, never a runtime one).

For every member of the SDK's ``UnwrapWebhookEvent`` the bridge must have a model of
the same name and ``type``, with the same fields, required and optional, all the way
down its data; and events built from the SDK's models must validate with the bridge's.
A newer SDK with a type or a field the bridge lacks fails here, naming it.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Literal, Union, get_args, get_origin

import openai
import openai.types.webhooks as sdk_webhooks
import pytest
from openai.types.webhooks import UnwrapWebhookEvent as SdkUnwrapWebhookEvent
from openai.types.webhooks.webhook_create_params import WebhookCreateParams
from pydantic import BaseModel

from bridge.events import (
    EVENT_MODELS,
    KNOWN_EVENT_TYPES,
    BatchFailedWebhookEvent,
    UnknownWebhookEvent,
    classify,
    parse_event,
    webhook_event_adapter,
)
from bridge.events.union import event_type_of, union_members

# The envelope's ``object`` is optional in the bridge for every type, where the SDK
# requires it for some: OpenAI's older events omit it, and a missing constant is no
# reason to quarantine an authentic event.
ALWAYS_OPTIONAL = {"object"}

JSON_KINDS: Mapping[object, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
}


SDK_MODELS: dict[str, type[BaseModel]] = {
    event_type_of(model): model for model in union_members(SdkUnwrapWebhookEvent)
}


def unmodelled_types(sdk_models: Mapping[str, type[BaseModel]]) -> list[str]:
    return sorted(sdk_models.keys() - KNOWN_EVENT_TYPES)


def assert_every_type_is_modelled(sdk_models: Mapping[str, type[BaseModel]]) -> None:
    missing = unmodelled_types(sdk_models)
    assert not missing, (
        f"openai {openai.__version__} has event types the bridge does not model: "
        f"{', '.join(missing)} (add them under bridge/events/)"
    )


def json_kind(annotation: Any) -> tuple[str, Any]:
    """What JSON a field holds (``None`` aside, ``Literal`` values aside), and what is inside."""
    arguments = [argument for argument in get_args(annotation) if argument is not type(None)]
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        kinds = {json_kind(argument) for argument in arguments}
        if len(kinds) == 1:
            return kinds.pop()
        return " or ".join(sorted(kind for kind, _inner in kinds)), None
    if origin is Literal:
        return JSON_KINDS[type(arguments[0])], None
    if origin is list:
        return "array", arguments[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model", annotation
    return JSON_KINDS.get(annotation, repr(annotation)), None


def kind_differences(sdk_annotation: Any, our_annotation: Any, where: str) -> list[str]:
    sdk_kind, sdk_inner = json_kind(sdk_annotation)
    our_kind, our_inner = json_kind(our_annotation)
    if sdk_kind != our_kind:
        return [f"{where}: {sdk_kind} in the SDK, {our_kind} in the bridge"]
    if sdk_kind == "model":
        return field_differences(sdk_inner, our_inner, prefix=f"{where}.")
    if sdk_kind == "array":
        return kind_differences(sdk_inner, our_inner, f"{where}[]")
    return []


def field_differences(
    sdk_model: type[BaseModel], our_model: type[BaseModel], *, prefix: str = ""
) -> list[str]:
    """Every field where the bridge's model departs from the SDK's, as ``data.x: why``."""
    found = []
    for name, sdk_field in sdk_model.model_fields.items():
        where = prefix + name
        our_field = our_model.model_fields.get(name)
        if our_field is None:
            found.append(f"{where}: missing in the bridge")
            continue
        sdk_required = sdk_field.is_required() and where not in ALWAYS_OPTIONAL
        if sdk_required != our_field.is_required():
            found.append(
                f"{where}: {'required' if sdk_required else 'optional'} in the SDK, "
                f"{'required' if our_field.is_required() else 'optional'} in the bridge"
            )
        found += kind_differences(sdk_field.annotation, our_field.annotation, where)
    for name in sorted(our_model.model_fields.keys() - sdk_model.model_fields.keys()):
        found.append(f"{prefix}{name}: not in the SDK")
    return found


def literal_choices(model: type[BaseModel]) -> int:
    """The most values any ``Literal`` in ``model`` (nested models too) can take."""
    most = 1
    for field in model.model_fields.values():
        most = max(most, _literal_choices_of(field.annotation))
    return most


def _literal_choices_of(annotation: Any) -> int:
    if get_origin(annotation) is Literal:
        return len(get_args(annotation))
    kind, inner = json_kind(annotation)
    if kind == "model":
        return literal_choices(inner)
    if kind == "array":
        return _literal_choices_of(inner)
    return max((_literal_choices_of(argument) for argument in get_args(annotation)), default=1)


def example_value(annotation: Any, name: str, *, full: bool, choice: int) -> Any:
    """A value for ``annotation``: the ``choice``-th value of a ``Literal``, a made-up one else."""
    if get_origin(annotation) is Literal:
        values = get_args(annotation)
        return values[choice % len(values)]
    if get_origin(annotation) in (Union, types.UnionType):
        first, *_others = [arg for arg in get_args(annotation) if arg is not type(None)]
        return example_value(first, name, full=full, choice=choice)
    kind, inner = json_kind(annotation)
    if kind == "model":
        return example_payload(inner, full=full, choice=choice)
    if kind == "array":
        return [example_value(inner, name, full=full, choice=choice + n) for n in range(2)]
    examples: dict[str, Any] = {"string": f"{name}_example", "integer": 1750287018}
    return examples[kind]


def example_payload(model: type[BaseModel], *, full: bool, choice: int) -> dict[str, Any]:
    """Every required field of ``model``, and with ``full`` every optional one too."""
    return {
        name: example_value(field.annotation, name, full=full, choice=choice)
        for name, field in model.model_fields.items()
        if full or field.is_required()
    }


def sdk_bodies(sdk_model: type[BaseModel]) -> Iterator[tuple[str, bytes]]:
    """Bodies serialised by the SDK's own model: minimal and full, each ``Literal`` value."""
    for choice in range(literal_choices(sdk_model)):
        for full in (False, True):
            event = sdk_model.model_validate(example_payload(sdk_model, full=full, choice=choice))
            label = f"{'full' if full else 'minimal'}, choice {choice}"
            yield f"{label}, set fields", event.model_dump_json(exclude_unset=True).encode()
            yield f"{label}, nulls kept", event.model_dump_json().encode()


def test_every_sdk_event_type_has_a_model_and_no_other() -> None:
    assert_every_type_is_modelled(SDK_MODELS)
    assert sorted(KNOWN_EVENT_TYPES - SDK_MODELS.keys()) == []
    assert len(SDK_MODELS) == 31


def test_a_type_a_newer_sdk_adds_is_named() -> None:
    class VideoCompletedWebhookEvent(BaseModel):
        id: str
        created_at: int
        data: dict[str, Any]
        type: Literal["video.completed"]

    newer_sdk: dict[str, type[BaseModel]] = {
        **SDK_MODELS,
        "video.completed": VideoCompletedWebhookEvent,
    }

    with pytest.raises(AssertionError, match=r"does not model: video\.completed \(add them"):
        assert_every_type_is_modelled(newer_sdk)


@pytest.mark.parametrize("event_type", sorted(SDK_MODELS))
def test_model_has_the_sdk_name_and_fields(event_type: str) -> None:
    sdk_model, our_model = SDK_MODELS[event_type], EVENT_MODELS[event_type]

    assert our_model.__name__ == sdk_model.__name__
    assert event_type_of(our_model) == event_type
    assert field_differences(sdk_model, our_model) == []


def test_field_comparison_reaches_into_nested_data() -> None:
    class DriftedHeader(BaseModel):
        name: str
        value: int

    class DriftedData(BaseModel):
        id: str
        reason: str
        headers: list[DriftedHeader] | None = None

    class DriftedBatchFailedWebhookEvent(BaseModel):
        id: str
        created_at: int
        data: DriftedData
        type: Literal["batch.failed"]
        object: Literal["event"]

    assert field_differences(DriftedBatchFailedWebhookEvent, BatchFailedWebhookEvent) == [
        "data.reason: missing in the bridge",
        "data.headers: missing in the bridge",
    ]
    realtime_sdk_model = SDK_MODELS["realtime.call.incoming"]
    assert field_differences(realtime_sdk_model, EVENT_MODELS["batch.failed"]) == [
        "data.call_id: missing in the bridge",
        "data.sip_headers: missing in the bridge",
        "data.sip_media_security: missing in the bridge",
        "data.id: not in the SDK",
    ]
    assert kind_differences(list[DriftedHeader], list[BaseModel], "data.sip_headers") == [
        "data.sip_headers[].name: missing in the bridge",
        "data.sip_headers[].value: missing in the bridge",
    ]
    assert kind_differences(int, str | None, "created_at") == [
        "created_at: integer in the SDK, string in the bridge"
    ]


@pytest.mark.parametrize("event_type", sorted(SDK_MODELS))
def test_events_built_from_the_sdk_models_validate_with_the_bridges(event_type: str) -> None:
    bodies = list(sdk_bodies(SDK_MODELS[event_type]))
    assert len(bodies) >= 4

    for label, body in bodies:
        event = webhook_event_adapter.validate_json(body)
        assert type(event) is EVENT_MODELS[event_type], label
        # Every field the SDK wrote, nested ones too, reads back with the same value.
        assert event.model_dump(mode="json", exclude_unset=True) == json.loads(body), label
        assert event.model_extra == {}, label
        classified = classify(body)
        assert (classified.kind, classified.event_type) == ("known", event_type), label


def test_every_literal_value_of_the_sdk_is_exercised() -> None:
    action_required = SDK_MODELS["agent.session.action_required"]
    sent = {
        json.loads(body)["data"]["required_action"]["type"]
        for _label, body in sdk_bodies(action_required)
    }

    assert sent == {
        "computer_use_approval_request",
        "mcp_approval_request",
        "function_call",
        "environment_connection",
    }


def test_subscribable_types_without_an_sdk_model_stay_unknown() -> None:
    (event_types,) = get_args(typing.get_type_hints(WebhookCreateParams)["event_types"])
    subscribable = set(get_args(event_types))

    without_model = sorted(subscribable - SDK_MODELS.keys())

    assert without_model == ["video.completed", "video.failed"]
    for event_type in without_model:
        body = json.dumps(
            {"object": "event", "id": "evt_1", "type": event_type, "created_at": 1, "data": {}}
        ).encode()
        assert classify(body).kind == "unknown"
        assert type(parse_event(body)) is UnknownWebhookEvent


def test_sdk_event_models_outside_its_union_stay_unknown() -> None:
    # The SDK ships models its ``unwrap`` does not accept; the bridge follows the union.
    outside = {
        event_type_of(model): model
        for name, model in vars(sdk_webhooks).items()
        if name.endswith("WebhookEvent")
        and isinstance(model, type)
        and issubclass(model, BaseModel)
        and model not in SDK_MODELS.values()
    }

    assert sorted(outside) == ["safety_identifier.blocked"]
    for sdk_model in outside.values():
        for label, body in sdk_bodies(sdk_model):
            assert classify(body).kind == "unknown", label
