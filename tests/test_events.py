import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from bridge.events import (
    EVENT_MODELS,
    KNOWN_EVENT_TYPES,
    AgentSessionActionRequiredWebhookEvent,
    AgentSessionCreatedWebhookEvent,
    LiveTransportConnectedWebhookEvent,
    LiveTransportIncomingWebhookEvent,
    RealtimeCallIncomingWebhookEvent,
    UnknownWebhookEvent,
    classify,
    parse_event,
    unknown_event_adapter,
    webhook_event_adapter,
)

# OpenAI's webhook event reference (API reference, "Webhooks") as it stood for the first
# fifteen models, kept as text in the repo; the SDK's union holds the rest (test_events_sdk.py).
EVENT_CATALOG = Path(__file__).parent / "data" / "openai-webhook-event-types.txt"
CREATED_AT = 1750287018


def seed_event_types() -> list[str]:
    catalog = EVENT_CATALOG.read_text()
    return sorted(set(re.findall(r'^type: "([a-z_.]+)"', catalog, re.MULTILINE)))


def sdk_class_name(event_type: str) -> str:
    words = re.split(r"[._]", event_type)
    return "".join(word.capitalize() for word in words) + "WebhookEvent"


SIP_HEADERS = [
    {"name": "From", "value": "sip:+15551234567@example.com"},
    {"name": "To", "value": "sip:+15557654321@example.com"},
    {"name": "Call-ID", "value": "03782086-4ce9-44bf-8b0d-4e303d2cc590"},
]
AGENT_SESSION = {"id": "sess_abc123", "environment_type": "openai_hosted"}

# The required fields of each event's data, as OpenAI documents them; "id" for all others.
REQUIRED_DATA: dict[str, dict[str, Any]] = {
    "realtime.call.incoming": {
        "call_id": "rtc_479a275623b54bdb9b6fbae2f7cbd408",
        "sip_headers": SIP_HEADERS,
    },
    "live.call.incoming": {"session_id": "live_abc123", "sip_headers": SIP_HEADERS},
    "live.transport.incoming": {
        "session_id": "live_abc123",
        "sip_headers": SIP_HEADERS,
        "type": "sip",
    },
    "live.transport.connected": {"session_id": "live_abc123", "type": "webrtc"},
    "agent.session.created": AGENT_SESSION,
    "agent.session.in_progress": AGENT_SESSION,
    "agent.session.idle": AGENT_SESSION,
    "agent.session.failed": AGENT_SESSION,
    "agent.session.action_required": {
        "id": "sess_abc123",
        "required_action": {"type": "function_call"},
    },
}


def seed_payload(event_type: str) -> dict[str, Any]:
    return {
        "object": "event",
        "id": "evt_685343a1381c819085d44c354e1b330e",
        "type": event_type,
        "created_at": CREATED_AT,
        "data": copy.deepcopy(REQUIRED_DATA.get(event_type, {"id": "obj_123"})),
    }


def envelope(event_type: Any, **fields: Any) -> bytes:
    event: dict[str, Any] = {
        "id": "evt_685343a1381c819085d44c354e1b330e",
        "type": event_type,
        "created_at": CREATED_AT,
        "data": {"id": "obj_123"},
    }
    event.update(fields)
    return json.dumps(event).encode()


def test_known_event_types_include_the_seed_catalogue() -> None:
    # The SDK's own union holds the full list: tests/test_events_sdk.py.
    assert len(seed_event_types()) == 15
    assert set(seed_event_types()) < KNOWN_EVENT_TYPES
    assert len(KNOWN_EVENT_TYPES) == 31
    assert set(EVENT_MODELS) == KNOWN_EVENT_TYPES


@pytest.mark.parametrize("event_type", sorted(KNOWN_EVENT_TYPES))
def test_event_with_its_required_fields_validates_to_its_model(event_type: str) -> None:
    body = json.dumps(seed_payload(event_type)).encode()

    event = webhook_event_adapter.validate_json(body)

    assert type(event).__name__ == sdk_class_name(event_type)
    assert type(event) is EVENT_MODELS[event_type]
    assert event.type == event_type
    assert event.created_at == CREATED_AT
    assert event.object == "event"
    assert type(parse_event(body)) is EVENT_MODELS[event_type]
    assert classify(body).kind == "known"
    assert classify(body).event_type == event_type
    assert classify(body).created_at == CREATED_AT
    assert classify(body).reason is None


@pytest.mark.parametrize("event_type", sorted(KNOWN_EVENT_TYPES))
def test_object_field_is_optional(event_type: str) -> None:
    payload = seed_payload(event_type)
    del payload["object"]

    event = parse_event(json.dumps(payload).encode())

    assert type(event) is EVENT_MODELS[event_type]
    assert event.object is None


@pytest.mark.parametrize(
    ("event_type", "data"),
    [
        ("realtime.call.incoming", {"sip_media_security": "srtp"}),
        ("live.call.incoming", {"sip_media_security": "rtp"}),
        ("live.transport.incoming", {"sip_media_security": "srtp"}),
        ("agent.session.created", {"environment_id": "ccarenv_1", "connect": None}),
        ("agent.session.idle", {"environment_id": None}),
    ],
)
def test_optional_data_fields_are_accepted_present_or_null(
    event_type: str, data: dict[str, Any]
) -> None:
    payload = seed_payload(event_type)
    payload["data"].update(data)

    event = webhook_event_adapter.validate_json(json.dumps(payload))

    assert type(event) is EVENT_MODELS[event_type]
    assert event.data.model_dump(include=set(data)) == data
    assert event.data.model_extra == {}


def test_agent_session_created_carries_the_self_hosted_connection() -> None:
    payload = seed_payload("agent.session.created")
    payload["data"].update(
        environment_type="self_hosted",
        environment_id="ccarenv_abc123",
        connect={"remote_url": "https://api.openai.com/v1/agents/api"},
    )

    event = parse_event(json.dumps(payload).encode())

    assert isinstance(event, AgentSessionCreatedWebhookEvent)
    assert event.data.connect is not None
    assert event.data.connect.remote_url == "https://api.openai.com/v1/agents/api"
    assert event.data.environment_id == "ccarenv_abc123"


@pytest.mark.parametrize(
    ("event_type", "path", "value"),
    [
        ("agent.session.action_required", ("required_action", "type"), "payment_approval"),
        ("live.transport.incoming", ("type",), "websocket"),
        ("live.transport.connected", ("type",), "sip"),
        ("realtime.call.incoming", ("sip_media_security",), "zrtp"),
    ],
)
def test_enumerations_accept_values_openai_adds_later(
    event_type: str, path: tuple[str, ...], value: str
) -> None:
    payload = seed_payload(event_type)
    *parents, leaf = path
    container = payload["data"]
    for key in parents:
        container = container[key]
    container[leaf] = value

    event = parse_event(json.dumps(payload).encode())

    assert type(event) is EVENT_MODELS[event_type]
    assert classify(json.dumps(payload).encode()).kind == "known"


def test_typed_access_to_the_new_families() -> None:
    connected = parse_event(json.dumps(seed_payload("live.transport.connected")).encode())
    incoming = parse_event(json.dumps(seed_payload("live.transport.incoming")).encode())
    action = parse_event(json.dumps(seed_payload("agent.session.action_required")).encode())

    assert isinstance(connected, LiveTransportConnectedWebhookEvent)
    assert (connected.data.session_id, connected.data.type) == ("live_abc123", "webrtc")
    assert isinstance(incoming, LiveTransportIncomingWebhookEvent)
    assert incoming.data.type == "sip"
    assert incoming.data.sip_media_security is None
    assert [header.name for header in incoming.data.sip_headers] == ["From", "To", "Call-ID"]
    assert isinstance(action, AgentSessionActionRequiredWebhookEvent)
    assert action.data.required_action.type == "function_call"


def test_fields_added_by_openai_are_kept() -> None:
    payload = seed_payload("realtime.call.incoming")
    payload["data"]["sip_trunk"] = "trunk_1"
    payload["data"]["sip_headers"][0]["index"] = 0
    payload["livemode"] = True

    event = parse_event(json.dumps(payload).encode())

    assert isinstance(event, RealtimeCallIncomingWebhookEvent)
    assert event.data.model_extra == {"sip_trunk": "trunk_1"}
    assert event.data.sip_headers[0].model_extra == {"index": 0}
    assert event.model_extra == {"livemode": True}
    assert event.data.call_id == "rtc_479a275623b54bdb9b6fbae2f7cbd408"
    assert [header.name for header in event.data.sip_headers] == ["From", "To", "Call-ID"]


@pytest.mark.parametrize(
    "event_type",
    [
        "video.completed",
        "video.failed",
        "safety_identifier.blocked",
        "agent.session.archived",
        "batch.completed.v2",
        "a.b",
    ],
)
def test_unknown_event_type_with_good_envelope_is_unknown(event_type: str) -> None:
    body = envelope(event_type, data={"session_id": "sess_1", "nested": {"x": [1]}}, extra=1)

    classified = classify(body)

    assert classified.kind == "unknown"
    assert classified.event_type == event_type
    assert classified.created_at == CREATED_AT
    assert classified.reason is None
    event = parse_event(body)
    assert isinstance(event, UnknownWebhookEvent)
    assert event.data == {"session_id": "sess_1", "nested": {"x": [1]}}
    assert event.model_extra == {"extra": 1}


def test_unknown_event_type_may_reach_the_routing_key_limit() -> None:
    event_type = "a." + "b" * 253

    assert classify(envelope(event_type)).kind == "unknown"
    assert classify(envelope(event_type + "c")).kind == "malformed"


NESTED_BRACKETS = b"[" * 100_000
NESTED_OBJECTS = b'{"type":"video.completed","id":"e","created_at":1,"data":' + (b'{"a":' * 100_000)

MALFORMED = [
    pytest.param(b"", "body is not valid JSON", id="empty"),
    pytest.param(b"not json", "body is not valid JSON", id="not-json"),
    pytest.param(b'{"type": "batch.completed",', "body is not valid JSON", id="truncated"),
    pytest.param(b"\xff\xfe{}", "body is not valid JSON", id="invalid-utf8"),
    pytest.param(
        envelope("batch.completed").replace(b"obj_123", b"obj_\xff"),
        "body is not valid JSON",
        id="invalid-utf8-in-string",
    ),
    pytest.param(
        envelope("batch.completed").replace(b"obj_123", b"\\ud800"),
        "body is not valid JSON",
        id="lone-surrogate",
    ),
    pytest.param(NESTED_BRACKETS, "body is not valid JSON", id="deep-array"),
    pytest.param(NESTED_OBJECTS, "body is not valid JSON", id="deep-object-in-data"),
    pytest.param(
        envelope("batch.completed").replace(b"1750287018", b"9" * 5000),
        "body is not valid JSON",
        id="number-too-long",
    ),
    pytest.param(b"[]", "body is not a JSON object", id="empty-array"),
    pytest.param(b'[{"type": "batch.completed"}]', "body is not a JSON object", id="array"),
    pytest.param(b'"batch.completed"', "body is not a JSON object", id="string"),
    pytest.param(b"null", "body is not a JSON object", id="null"),
    pytest.param(b"42", "body is not a JSON object", id="number"),
    pytest.param(b'{"id": "evt_1", "created_at": 1, "data": {}}', "missing", id="missing-type"),
    pytest.param(envelope(None), "missing", id="null-type"),
    pytest.param(envelope(42), "missing", id="number-type"),
    pytest.param(envelope(["batch.completed"]), "missing", id="array-type"),
    pytest.param(envelope(""), "missing", id="empty-type"),
    pytest.param(envelope("batch.#"), "missing", id="hash-wildcard"),
    pytest.param(envelope("batch.*"), "missing", id="star-wildcard"),
    pytest.param(envelope("#"), "missing", id="bare-hash"),
    pytest.param(envelope("Batch.Completed"), "missing", id="uppercase"),
    pytest.param(envelope("batch completed"), "missing", id="space"),
    pytest.param(envelope("batch. completed"), "missing", id="space-after-dot"),
    pytest.param(envelope("batch"), "missing", id="single-word"),
    pytest.param(envelope("batch..completed"), "missing", id="empty-word"),
    pytest.param(envelope(".batch.completed"), "missing", id="leading-dot"),
    pytest.param(envelope("batch.completed."), "missing", id="trailing-dot"),
    pytest.param(envelope("batch.completed\n"), "missing", id="trailing-newline"),
    pytest.param(envelope("batch-completed.x"), "missing", id="hyphen"),
    pytest.param(envelope("a." + "b" * 300), "missing", id="too-long"),
    pytest.param(
        envelope("batch.completed", data={}),
        "batch.completed failed schema validation: data.id: Field required",
        id="known-missing-data-id",
    ),
    pytest.param(
        envelope("batch.completed", data=[]),
        "batch.completed failed schema validation: data:",
        id="known-data-not-object",
    ),
    pytest.param(
        envelope("realtime.call.incoming", data={"call_id": "rtc_1", "sip_headers": [{}]}),
        "realtime.call.incoming failed schema validation: data.sip_headers.0.name:",
        id="known-bad-sip-header",
    ),
    pytest.param(
        envelope("agent.session.action_required", data={"id": "sess_1"}),
        "agent.session.action_required failed schema validation: data.required_action: Field",
        id="known-missing-required-action",
    ),
    pytest.param(
        envelope("agent.session.idle", data={"id": "sess_1"}),
        "agent.session.idle failed schema validation: data.environment_type: Field required",
        id="known-missing-environment-type",
    ),
    pytest.param(
        envelope(
            "agent.session.created",
            data={"id": "sess_1", "environment_type": "self_hosted", "connect": {}},
        ),
        "agent.session.created failed schema validation: data.connect.remote_url: Field required",
        id="known-connect-without-url",
    ),
    pytest.param(
        envelope("live.transport.incoming", data={"session_id": "live_1", "sip_headers": []}),
        "live.transport.incoming failed schema validation: data.type: Field required",
        id="known-missing-transport",
    ),
    pytest.param(
        envelope("live.transport.connected", data={"id": "live_1", "type": "webrtc"}),
        "live.transport.connected failed schema validation: data.session_id: Field required",
        id="known-live-without-session-id",
    ),
    pytest.param(
        envelope("safety.alert.created", data={"alert_id": "alert_1"}),
        "safety.alert.created failed schema validation: data.id: Field required",
        id="known-safety-without-id",
    ),
    pytest.param(
        envelope("batch.completed", object="list"),
        "batch.completed failed schema validation: object:",
        id="known-wrong-object",
    ),
    pytest.param(
        envelope("response.completed", created_at=float("nan")),
        "response.completed failed schema validation: created_at:",
        id="known-nan-timestamp",
    ),
    pytest.param(
        envelope("response.completed").replace(b"1750287018", b"1e400"),
        "response.completed failed schema validation: created_at:",
        id="known-infinite-timestamp",
    ),
    pytest.param(
        envelope("video.completed", created_at="1750287018"),
        "video.completed failed envelope validation: created_at:",
        id="unknown-string-timestamp",
    ),
    pytest.param(
        envelope("video.completed", created_at=1750287018.0),
        "video.completed failed envelope validation: created_at:",
        id="unknown-float-timestamp",
    ),
    pytest.param(
        envelope("video.completed", created_at=True),
        "video.completed failed envelope validation: created_at:",
        id="unknown-boolean-timestamp",
    ),
    pytest.param(
        envelope("video.completed", id=""),
        "video.completed failed envelope validation: id:",
        id="unknown-empty-id",
    ),
    pytest.param(
        envelope("video.completed", data=["x"]),
        "video.completed failed envelope validation: data:",
        id="unknown-data-not-object",
    ),
]


@pytest.mark.parametrize(("body", "reason_start"), MALFORMED)
def test_malformed_body_is_classified_not_raised(body: bytes, reason_start: str) -> None:
    classified = classify(body)

    assert classified.kind == "malformed"
    assert classified.reason is not None
    assert classified.reason.startswith(reason_start)
    assert len(classified.reason) <= 200
    with pytest.raises(ValidationError):
        parse_event(body)


def test_malformed_known_type_reports_its_type_and_timestamp() -> None:
    classified = classify(envelope("batch.failed", data={}))

    assert classified.event_type == "batch.failed"
    assert classified.created_at == CREATED_AT


def test_unusable_type_is_not_reported_as_event_type() -> None:
    classified = classify(envelope("batch.#"))

    assert classified.event_type is None
    assert classified.created_at == CREATED_AT


def test_unreadable_timestamp_is_not_reported() -> None:
    classified = classify(envelope("video.completed", created_at="soon"))

    assert classified.event_type == "video.completed"
    assert classified.created_at is None


def test_reason_does_not_echo_body_values() -> None:
    secret = "sk-proj-DoNotLogThis"
    bodies = [
        envelope(f"{secret}.x"),
        envelope("batch.completed", data={"id": [secret]}, object=secret),
        envelope("video.completed", created_at=secret, id={"v": secret}),
        envelope("realtime.call.incoming", data={"call_id": 1, "sip_headers": secret}),
    ]

    for body in bodies:
        reason = classify(body).reason
        assert reason is not None
        assert secret not in reason
        assert "DoNotLogThis" not in reason


def test_long_reason_is_truncated() -> None:
    headers = [{"name": index} for index in range(50)]
    body = envelope("realtime.call.incoming", data={"call_id": 1, "sip_headers": headers})

    reason = classify(body).reason

    assert reason is not None
    assert len(reason) == 200
    assert reason.endswith("...")


def test_duplicate_keys_use_the_last_value() -> None:
    valid_last = (
        b'{"type":"Not A Type","type":"batch.completed","id":"e","created_at":1,"data":{"id":"b"}}'
    )
    invalid_last = (
        b'{"type":"batch.completed","type":"batch.#","id":"e","created_at":1,"data":{"id":"b"}}'
    )

    assert classify(valid_last).kind == "known"
    assert classify(invalid_last).kind == "malformed"


def test_unknown_envelope_accepts_any_well_formed_event() -> None:
    body = json.dumps(seed_payload("batch.completed")).encode()

    event = unknown_event_adapter.validate_json(body)

    assert event.type == "batch.completed"
    assert event.data == {"id": "obj_123"}


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)

EVENT_TYPES = (
    st.sampled_from(sorted(KNOWN_EVENT_TYPES))
    | st.from_regex(r"[a-z0-9_]{1,6}(\.[a-z0-9_]{1,6}){1,3}", fullmatch=True)
    | st.text(max_size=12)
    | JSON_VALUES
)

ENVELOPES = st.fixed_dictionaries(
    {"type": EVENT_TYPES},
    optional={
        "id": st.text(max_size=8) | JSON_VALUES,
        "created_at": st.integers() | JSON_VALUES,
        "data": st.fixed_dictionaries({"id": st.text(max_size=8)}) | JSON_VALUES,
        "object": st.just("event") | JSON_VALUES,
    },
)


def assert_consistent(body: bytes) -> None:
    classified = classify(body)
    try:
        event = parse_event(body)
    except ValidationError:
        assert classified.kind == "malformed"
        assert classified.reason
        return
    assert classified.kind == ("known" if event.type in KNOWN_EVENT_TYPES else "unknown")
    assert classified.event_type == event.type
    assert classified.created_at == event.created_at
    assert classified.reason is None


@given(st.binary(max_size=512))
def test_classify_never_raises_for_arbitrary_bytes(body: bytes) -> None:
    assert_consistent(body)


@given(JSON_VALUES)
def test_classify_never_raises_for_arbitrary_json(value: Any) -> None:
    assert_consistent(json.dumps(value).encode())


@given(ENVELOPES)
def test_classify_agrees_with_parse_event_for_envelopes(event: dict[str, Any]) -> None:
    assert_consistent(json.dumps(event).encode())
