import json
import re

import pytest

from bridge.events import (
    EVENT_MODELS,
    KNOWN_EVENT_TYPES,
    AgentSessionCreatedWebhookEvent,
    SipInviteData,
    classify,
    parse_event,
    webhook_event_adapter,
)
from bridge.samples import UnknownEventTypeError, new_webhook_id, sample_body, sample_event

# What each event is about, by the dotted prefix of its type: the field and OpenAI's id format.
SUBJECT_SHAPES = {
    "agent.environment": ("id", r"ccarenv_[0-9a-f]{32}"),
    "agent.session": ("id", r"sess_[0-9a-f]{32}"),
    "batch": ("id", r"batch_[0-9a-f]{32}"),
    "eval.run": ("id", r"evalrun_[0-9a-f]{32}"),
    "fine_tuning.job": ("id", r"ftjob-[A-Za-z0-9]{24}"),
    "live": ("session_id", r"live_[0-9a-f]{32}"),
    "realtime.call": ("call_id", r"rtc_[0-9a-f]{32}"),
    "response": ("id", r"resp_[0-9a-f]{48}"),
    "safety.alert": ("id", r"alert_[0-9a-f]{32}"),
    "safety.org_alert": ("id", r"alert_[0-9a-f]{32}"),
    "safety.deactivation_issued": ("id", r"C-[0-9a-f]{12}"),
    "safety.warning_issued": ("id", r"C-[0-9a-f]{12}"),
}
SIP_CALL_TYPES = ["live.call.incoming", "live.transport.incoming", "realtime.call.incoming"]


def subject_shape(event_type: str) -> tuple[str, str]:
    (prefix,) = [prefix for prefix in SUBJECT_SHAPES if f"{event_type}.".startswith(f"{prefix}.")]
    return SUBJECT_SHAPES[prefix]


def fixed_clock() -> float:
    return 1750287018.75


@pytest.mark.parametrize("event_type", sorted(KNOWN_EVENT_TYPES))
def test_sample_is_a_valid_event_of_its_type(event_type: str) -> None:
    body = sample_body(event_type)

    classified = classify(body)

    assert classified.kind == "known"
    assert classified.event_type == event_type
    event = parse_event(body)
    assert type(event) is EVENT_MODELS[event_type]
    assert event.object == "event"
    assert re.fullmatch(r"evt_[0-9a-f]{32}", event.id)


@pytest.mark.parametrize("event_type", sorted(KNOWN_EVENT_TYPES))
def test_sample_subject_id_is_shaped_like_openai_ids(event_type: str) -> None:
    field, shape = subject_shape(event_type)

    subject_id = sample_event(event_type)["data"][field]

    assert re.fullmatch(shape, subject_id)


@pytest.mark.parametrize("event_type", SIP_CALL_TYPES)
def test_incoming_call_sample_carries_sip_invite_headers(event_type: str) -> None:
    event = webhook_event_adapter.validate_json(sample_body(event_type))

    assert isinstance(event.data, SipInviteData)
    assert event.data.sip_media_security == "srtp"
    headers = {header.name: header.value for header in event.data.sip_headers}
    assert {"From", "To", "Call-ID", "Via", "Contact"} <= headers.keys()
    assert re.search(r"<sip:\+1555\d{7}@example\.com>", headers["From"])
    assert re.search(r"<sip:\+1555\d{7}@sip\.example\.com>", headers["To"])


def test_sip_call_types_are_every_type_with_sip_headers() -> None:
    with_sip_headers = [
        t for t in sorted(KNOWN_EVENT_TYPES) if "sip_headers" in sample_event(t)["data"]
    ]

    assert with_sip_headers == SIP_CALL_TYPES


def test_agent_session_created_sample_is_a_self_hosted_session() -> None:
    event = parse_event(sample_body("agent.session.created"))

    assert isinstance(event, AgentSessionCreatedWebhookEvent)
    assert event.data.environment_type == "self_hosted"
    assert event.data.environment_id is not None
    assert event.data.connect is not None
    assert event.data.connect.remote_url.startswith("https://")


@pytest.mark.parametrize("event_type", sorted(KNOWN_EVENT_TYPES))
def test_each_sample_is_fresh(event_type: str) -> None:
    first = sample_event(event_type)
    second = sample_event(event_type)

    assert first["id"] != second["id"]
    assert first["data"] != second["data"]


def test_created_at_comes_from_the_clock() -> None:
    event = sample_event("batch.completed", clock=fixed_clock)

    assert event["created_at"] == 1750287018


def test_sample_body_is_compact_json_of_the_event() -> None:
    body = sample_body("response.completed", clock=fixed_clock)

    event = json.loads(body)
    assert body == json.dumps(event, separators=(",", ":")).encode()
    assert event["created_at"] == 1750287018
    assert list(event) == ["object", "id", "type", "created_at", "data"]


def test_overrides_set_top_level_and_nested_paths() -> None:
    event = sample_event(
        "batch.completed",
        overrides={
            "id": "evt_x",
            "created_at": "123",
            "data.id": "batch_123",
            "data.request_counts.completed": "7",
            "data.metadata": '{"team": "ml", "tags": [1, true, null]}',
            "object": "null",
        },
    )

    assert event["id"] == "evt_x"
    assert event["created_at"] == 123
    assert event["data"]["id"] == "batch_123"
    assert event["data"]["request_counts"] == {"completed": 7}
    assert event["data"]["metadata"] == {"team": "ml", "tags": [1, True, None]}
    assert event["object"] is None


def test_override_values_that_are_not_json_stay_strings() -> None:
    event = sample_event(
        "response.failed",
        overrides={"data.id": "resp_abc", "data.note": "NaN", "data.quoted": '"42"'},
    )

    assert event["data"] == {"id": "resp_abc", "note": "NaN", "quoted": "42"}


def test_override_can_index_into_sip_headers() -> None:
    event = sample_event(
        "realtime.call.incoming", overrides={"data.sip_headers.0.value": "SIP/2.0/TLS x"}
    )

    assert event["data"]["sip_headers"][0] == {"name": "Via", "value": "SIP/2.0/TLS x"}


def test_overrides_reach_the_body() -> None:
    body = sample_body("batch.completed", overrides={"data.id": "42"})

    classified = classify(body)

    assert json.loads(body)["data"]["id"] == 42
    assert classified.kind == "malformed"
    assert (
        classified.reason
        == "batch.completed failed schema validation: data.id: Input should be a valid string"
    )


@pytest.mark.parametrize("path", ["id.x", "data..id", "", "data.sip_headers.99.value"])
def test_override_path_that_cannot_be_set_is_rejected(path: str) -> None:
    with pytest.raises(ValueError, match="override path"):
        sample_event("realtime.call.incoming", overrides={path: "1"})


def test_unknown_event_type_lists_the_known_types() -> None:
    with pytest.raises(UnknownEventTypeError) as raised:
        sample_event("video.completed")

    message = str(raised.value)
    assert "'video.completed'" in message
    listed = message.split("known types: ", 1)[1].split(", ")
    assert listed == sorted(KNOWN_EVENT_TYPES)
    assert isinstance(raised.value, ValueError)
    with pytest.raises(UnknownEventTypeError, match=r"known types: agent\.environment\.expired, "):
        sample_body("nope")


def test_webhook_ids_are_shaped_like_openai_delivery_ids() -> None:
    first, second = new_webhook_id(), new_webhook_id()

    assert re.fullmatch(r"wh_[0-9a-f]{32}", first)
    assert first != second
