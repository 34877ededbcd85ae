"""AMQP 0-9-1 frames for one ``basic.publish``, encoded in one pass.

pamqp's general-purpose encoder inspects every property and table value's type on
each call; the bridge always publishes the same handful of properties, so encoding
them directly costs a fraction of that. ``tests/test_frames.py`` checks the bytes
against pamqp's own encoding.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

FRAME_END = b"\xce"
FRAME_OVERHEAD = 8  # type (1) + channel (2) + size (4) + frame end (1)
_METHOD, _HEADER, _BODY = 1, 2, 3
_BASIC_CLASS, _PUBLISH_METHOD = 60, 40

_CONTENT_TYPE_FLAG = 1 << 15
_HEADERS_FLAG = 1 << 13
_DELIVERY_MODE_FLAG = 1 << 12
_MESSAGE_ID_FLAG = 1 << 7
_TIMESTAMP_FLAG = 1 << 6
_TYPE_FLAG = 1 << 5
_APP_ID_FLAG = 1 << 3

_frame_head = struct.Struct(">BHI").pack
_content_head = struct.Struct(">HHQH").pack
_long = struct.Struct(">I").pack
_long_long = struct.Struct(">Q").pack

HeaderValue = str | bool
APP_ID = "openai-webhook-bridge"


@dataclass(slots=True)  # built per request: a frozen one costs five times as much
class MessageProperties:
    """The properties the bridge sets on every message (names as in pamqp/aio-pika)."""

    message_id: str
    headers: Mapping[str, HeaderValue] = field(default_factory=dict)
    message_type: str | None = None
    timestamp: int | None = None
    content_type: str = "application/json"
    delivery_mode: int = 2
    app_id: str = APP_ID


def _short_string(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ValueError(f"AMQP short string over 255 bytes: {value[:40]!r}...")
    return bytes((len(raw),)) + raw


_recurring_short_string = lru_cache(maxsize=512)(_short_string)
"""For what recurs from message to message: header names, content type, app id, event types."""


def _table(entries: Mapping[str, HeaderValue]) -> bytes:
    parts = []
    for name, value in entries.items():
        parts.append(_recurring_short_string(name))
        if isinstance(value, bool):
            parts.append(b"t\x01" if value else b"t\x00")
        else:
            raw = value.encode()
            parts.append(b"S" + _long(len(raw)) + raw)
    encoded = b"".join(parts)
    return _long(len(encoded)) + encoded


@lru_cache(maxsize=1024)
def _method_frame(channel: int, exchange: str, routing_key: str, mandatory: bool) -> bytes:
    payload = (
        struct.pack(">HHH", _BASIC_CLASS, _PUBLISH_METHOD, 0)
        + _short_string(exchange)
        + _short_string(routing_key)
        + (b"\x01" if mandatory else b"\x00")
    )
    return _frame_head(_METHOD, channel, len(payload)) + payload + FRAME_END


def _properties(properties: MessageProperties) -> tuple[int, bytes]:
    flags = _CONTENT_TYPE_FLAG | _DELIVERY_MODE_FLAG | _MESSAGE_ID_FLAG | _APP_ID_FLAG
    parts = [_recurring_short_string(properties.content_type)]
    if properties.headers:
        flags |= _HEADERS_FLAG
        parts.append(_table(properties.headers))
    parts.append(bytes((properties.delivery_mode,)))
    parts.append(_short_string(properties.message_id))
    if properties.timestamp is not None:
        flags |= _TIMESTAMP_FLAG
        parts.append(_long_long(properties.timestamp))
    if properties.message_type is not None:
        flags |= _TYPE_FLAG
        parts.append(_recurring_short_string(properties.message_type))
    parts.append(_recurring_short_string(properties.app_id))
    return flags, b"".join(parts)


def encode_publish(
    *,
    channel: int,
    exchange: str,
    routing_key: str,
    properties: MessageProperties,
    body: bytes,
    max_body_frame_size: int,
    mandatory: bool = True,
) -> bytes:
    """The method, content-header and body frames of one publish, ready for the socket."""
    flags, encoded_properties = _properties(properties)
    header_payload = _content_head(_BASIC_CLASS, 0, len(body), flags) + encoded_properties
    parts = [
        _method_frame(channel, exchange, routing_key, mandatory),
        _frame_head(_HEADER, channel, len(header_payload)),
        header_payload,
        FRAME_END,
    ]
    for start in range(0, len(body), max_body_frame_size):
        piece = body[start : start + max_body_frame_size]
        parts += (_frame_head(_BODY, channel, len(piece)), piece, FRAME_END)
    return b"".join(parts)
