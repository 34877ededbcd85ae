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
    RealtimeCallIncomingWebhookEvent,
    UnknownWebhookEvent,
    classify,
    parse_event,
    unknown_event_adapter,
    webhook_event_adapter,
)

# OpenAI's webhook event reference (API reference, "Webhooks"), as text, kept in the repo so
# that the tests see exactly the catalog the models were written against.
EVENT_CATALOG = Path(__file__).parent / "data" / "openai-webhook-event-types.txt"
CREATED_AT = 1750287018


def seed_event_types() -> list[str]:
    catalog = EVENT_CATALOG.read_text()
    return sorted(set(re.findall(r'^type: "([a-z_.]+)"', catalog, re.MULTILINE)))


def sdk_class_name(event_type: str) -> str:
    words = re.split(r"[._]", event_type)
    return "".join(word.capitalize() for word in words) + "WebhookEvent"


def seed_payload(event_type: str) -> dict[str, Any]:
    data: dict[str, Any] = {"id": "obj_123"}
    if event_type == "realtime.call.incoming":
        data = {
            "call_id": "rtc_479a275623b54bdb9b6fbae2f7cbd408",
            "sip_headers": [
                {"name": "From", "value": "sip:+15551234567@example.com"},
                {"name": "To", "value": "sip:+15557654321@example.com"},
                {"name": "Call-ID", "value": "03782086-4ce9-44bf-8b0d-4e303d2cc590"},
            ],
        }
    return {
        "object": "event",
        "id": "evt_685343a1381c819085d44c354e1b330e",
        "type": event_type,
        "created_at": CREATED_AT,
        "data": data,
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


def test_known_event_types_are_the_seed_catalogue() -> None:
    assert len(KNOWN_EVENT_TYPES) == 15
    assert sorted(KNOWN_EVENT_TYPES) == seed_event_types()
    assert set(EVENT_MODELS) == KNOWN_EVENT_TYPES


@pytest.mark.parametrize("event_type", seed_event_types())
def test_seed_event_validates_to_its_model(event_type: str) -> None:
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


def test_object_field_is_optional() -> None:
    event = parse_event(envelope("batch.completed"))

    assert event.object is None


def test_fields_added_by_openai_are_kept() -> None:
    payload = seed_payload("realtime.call.incoming")
    payload["data"]["sip_media_security"] = "srtp"
    payload["data"]["sip_headers"][0]["index"] = 0
    payload["livemode"] = True

    event = parse_event(json.dumps(payload).encode())

    assert isinstance(event, RealtimeCallIncomingWebhookEvent)
    assert event.data.model_extra == {"sip_media_security": "srtp"}
    assert event.data.sip_headers[0].model_extra == {"index": 0}
    assert event.model_extra == {"livemode": True}
    assert event.data.call_id == "rtc_479a275623b54bdb9b6fbae2f7cbd408"
    assert [header.name for header in event.data.sip_headers] == ["From", "To", "Call-ID"]


@pytest.mark.parametrize(
    "event_type",
    [
        "agent.session.created",
        "safety.alert.created",
        "live.transport.incoming",
        "safety.org_alert.created",
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
NESTED_OBJECTS = b'{"type":"agent.session.created","id":"e","created_at":1,"data":' + (
    b'{"a":' * 100_000
)

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
        envelope("agent.session.created", created_at="1750287018"),
        "agent.session.created failed envelope validation: created_at:",
        id="unknown-string-timestamp",
    ),
    pytest.param(
        envelope("agent.session.created", created_at=1750287018.0),
        "agent.session.created failed envelope validation: created_at:",
        id="unknown-float-timestamp",
    ),
    pytest.param(
        envelope("agent.session.created", created_at=True),
        "agent.session.created failed envelope validation: created_at:",
        id="unknown-boolean-timestamp",
    ),
    pytest.param(
        envelope("agent.session.created", id=""),
        "agent.session.created failed envelope validation: id:",
        id="unknown-empty-id",
    ),
    pytest.param(
        envelope("agent.session.created", data=["x"]),
        "agent.session.created failed envelope validation: data:",
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
    classified = classify(envelope("agent.session.created", created_at="soon"))

    assert classified.event_type == "agent.session.created"
    assert classified.created_at is None


def test_reason_does_not_echo_body_values() -> None:
    secret = "sk-proj-DoNotLogThis"
    bodies = [
        envelope(f"{secret}.x"),
        envelope("batch.completed", data={"id": [secret]}, object=secret),
        envelope("agent.session.created", created_at=secret, id={"v": secret}),
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
