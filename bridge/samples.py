"""Realistic sample webhook events, shaped like the ones OpenAI sends.

Every call builds a fresh event: new ids in OpenAI's formats and a current
``created_at``, so samples can be published repeatedly without colliding.
"""

import json
import secrets
import string
import time
from collections.abc import Callable, Mapping, MutableMapping, MutableSequence
from typing import Any, NoReturn

from bridge.events import KNOWN_EVENT_TYPES

__all__ = [
    "UnknownEventTypeError",
    "new_webhook_id",
    "sample_body",
    "sample_event",
]

_ALPHANUMERICS = string.ascii_letters + string.digits


class UnknownEventTypeError(ValueError):
    """Raised for an event type that has no sample."""

    def __init__(self, event_type: str) -> None:
        self.event_type = event_type
        self.known_types = sorted(KNOWN_EVENT_TYPES)
        super().__init__(
            f"unknown event type {event_type!r}; known types: {', '.join(self.known_types)}"
        )


def new_webhook_id() -> str:
    """A delivery id shaped like OpenAI's ``webhook-id`` header."""
    return _hex_id("wh_")


def sample_event(
    event_type: str,
    *,
    overrides: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """A fresh, JSON-ready event of ``event_type``.

    ``overrides`` maps dotted paths into the event (``data.id``, ``created_at``)
    to values; a value that parses as JSON is used as JSON, any other as a string.
    """
    if event_type not in KNOWN_EVENT_TYPES:
        raise UnknownEventTypeError(event_type)
    event: dict[str, Any] = {
        "object": "event",
        "id": _hex_id("evt_"),
        "type": event_type,
        "created_at": int(clock()),
        "data": _data_factory(event_type)(),
    }
    for path, raw_value in (overrides or {}).items():
        _set_path(event, path, _parse_override_value(raw_value))
    return event


def sample_body(
    event_type: str,
    *,
    overrides: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
) -> bytes:
    """A fresh event of ``event_type`` as compact JSON bytes, as OpenAI sends them."""
    event = sample_event(event_type, overrides=overrides, clock=clock)
    return json.dumps(event, separators=(",", ":"), allow_nan=False).encode()


def _hex_id(prefix: str, hex_digits: int = 32) -> str:
    return prefix + secrets.token_hex(hex_digits // 2)


def _fine_tuning_job_id() -> str:
    return "ftjob-" + "".join(secrets.choice(_ALPHANUMERICS) for _ in range(24))


def _safety_case_id() -> str:
    return "C-" + secrets.token_hex(6)


def _resource_data(id_factory: Callable[[], str]) -> Callable[[], dict[str, Any]]:
    return lambda: {"id": id_factory()}


def _sip_invite_headers() -> list[dict[str, str]]:
    # Documentation-only numbers (555), domains (example.com) and addresses (TEST-NET-3).
    caller = "+15551234567"
    callee = "+15557654321"
    proxy = "203.0.113.10"
    return [
        {"name": "Via", "value": f"SIP/2.0/UDP {proxy}:5060;branch=z9hG4bK{secrets.token_hex(8)}"},
        {"name": "Max-Forwards", "value": "70"},
        {
            "name": "From",
            "value": f'"Example Caller" <sip:{caller}@example.com>;tag={secrets.token_hex(5)}',
        },
        {"name": "To", "value": f"<sip:{callee}@sip.example.com>"},
        {"name": "Call-ID", "value": f"{secrets.token_hex(16)}@{proxy}"},
        {"name": "CSeq", "value": "1 INVITE"},
        {"name": "Contact", "value": f"<sip:{caller}@{proxy}:5060>"},
        {"name": "User-Agent", "value": "ExamplePBX/1.0"},
        {"name": "Content-Type", "value": "application/sdp"},
    ]


def _sip_call_data(id_field: str, id_prefix: str, **transport: str) -> Callable[[], dict[str, Any]]:
    return lambda: {
        id_field: _hex_id(id_prefix),
        "sip_headers": _sip_invite_headers(),
        **transport,
        "sip_media_security": "srtp",
    }


def _agent_session_data() -> dict[str, Any]:
    return {
        "id": _hex_id("sess_"),
        "environment_type": "openai_hosted",
        "environment_id": _hex_id("ccarenv_"),
    }


def _agent_session_created_data() -> dict[str, Any]:
    return {
        **_agent_session_data(),
        "environment_type": "self_hosted",
        "connect": {"remote_url": "https://api.openai.com/v1/agents/api"},
    }


def _agent_session_action_required_data() -> dict[str, Any]:
    return {"id": _hex_id("sess_"), "required_action": {"type": "function_call"}}


def _live_transport_connected_data() -> dict[str, Any]:
    return {"session_id": _hex_id("live_"), "type": "webrtc"}


_DATA_FACTORIES: Mapping[str, Callable[[], dict[str, Any]]] = {
    "agent.environment": _resource_data(lambda: _hex_id("ccarenv_")),
    "agent.session": _agent_session_data,
    "agent.session.action_required": _agent_session_action_required_data,
    "agent.session.created": _agent_session_created_data,
    "batch": _resource_data(lambda: _hex_id("batch_")),
    "eval.run": _resource_data(lambda: _hex_id("evalrun_")),
    "fine_tuning.job": _resource_data(_fine_tuning_job_id),
    "live.call.incoming": _sip_call_data("session_id", "live_"),
    "live.transport.connected": _live_transport_connected_data,
    "live.transport.incoming": _sip_call_data("session_id", "live_", type="sip"),
    "realtime.call.incoming": _sip_call_data("call_id", "rtc_"),
    "response": _resource_data(lambda: _hex_id("resp_", hex_digits=48)),
    "safety.alert": _resource_data(lambda: _hex_id("alert_")),
    "safety.deactivation_issued": _resource_data(_safety_case_id),
    "safety.org_alert": _resource_data(lambda: _hex_id("alert_")),
    "safety.warning_issued": _resource_data(_safety_case_id),
}
"""Data payload factories, by event type or by the dotted prefix a family of types shares."""


def _data_factory(event_type: str) -> Callable[[], dict[str, Any]]:
    words = event_type.split(".")
    for length in range(len(words), 0, -1):
        factory = _DATA_FACTORIES.get(".".join(words[:length]))
        if factory is not None:
            return factory
    raise KeyError(f"no sample data for {event_type!r}")


def _parse_override_value(raw_value: str) -> Any:
    try:
        return json.loads(raw_value, parse_constant=_reject_non_finite)
    except ValueError:
        return raw_value


def _reject_non_finite(constant: str) -> NoReturn:
    # NaN and Infinity are not JSON; such a value is meant as a string.
    raise ValueError(constant)


def _set_path(event: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    if not all(keys):
        raise ValueError(f"override path {path!r} has an empty segment")
    *parents, leaf = keys
    container: Any = event
    for key in parents:
        if isinstance(container, MutableMapping):
            container = container.setdefault(key, {})
        else:
            container = container[_list_index(container, key, path)]
    if isinstance(container, MutableMapping):
        container[leaf] = value
    else:
        container[_list_index(container, leaf, path)] = value


def _list_index(container: Any, key: str, path: str) -> int:
    if isinstance(container, MutableSequence) and key.isdigit() and int(key) < len(container):
        return int(key)
    raise ValueError(f"override path {path!r} does not lead to an object or array at {key!r}")
