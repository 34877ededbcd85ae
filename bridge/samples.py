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
    family = event_type.partition(".")[0]
    event: dict[str, Any] = {
        "object": "event",
        "id": _hex_id("evt_"),
        "type": event_type,
        "created_at": int(clock()),
        "data": _DATA_FACTORIES[family](),
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


def _resource_data(id_factory: Callable[[], str]) -> Callable[[], dict[str, Any]]:
    return lambda: {"id": id_factory()}


def _realtime_call_data() -> dict[str, Any]:
    # Documentation-only numbers (555), domains (example.com) and addresses (TEST-NET-3).
    caller = "+15551234567"
    callee = "+15557654321"
    proxy = "203.0.113.10"
    return {
        "call_id": _hex_id("rtc_"),
        "sip_headers": [
            {
                "name": "Via",
                "value": f"SIP/2.0/UDP {proxy}:5060;branch=z9hG4bK{secrets.token_hex(8)}",
            },
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
        ],
    }


_DATA_FACTORIES: Mapping[str, Callable[[], dict[str, Any]]] = {
    "batch": _resource_data(lambda: _hex_id("batch_")),
    "eval": _resource_data(lambda: _hex_id("evalrun_")),
    "fine_tuning": _resource_data(_fine_tuning_job_id),
    "realtime": _realtime_call_data,
    "response": _resource_data(lambda: _hex_id("resp_", hex_digits=48)),
}
"""Data payload factories, by the event type's first word."""


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
