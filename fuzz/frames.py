"""The AMQP publish encoder: every encodable message decodes back to itself.

For any channel, exchange, routing key, properties, body and frame size,
``encode_publish`` either raises ``ValueError`` because a short string is over
255 bytes (and only then), or produces frames that pamqp decodes into the same
publish: the method's exchange, routing key and ``mandatory``, every property, the
body split into frames no larger than the limit, and nothing else.

Strings are drawn without lone surrogates (they are not UTF-8), and timestamps up
to 2**32 - 1: above that pamqp reads the value as milliseconds, which is pamqp's
convention, not the encoder's (the ``publish_path`` harness holds the bridge to
pamqp's reading for the timestamps it actually sends).
"""

from __future__ import annotations

import atheris

from bridge.frames import HeaderValue, MessageProperties, encode_publish
from fuzz.amqp_decoding import decode_publish, instant

SHORT_STRING_MAX_BYTES = 255
MAX_SECONDS_PAMQP_READS_AS_SECONDS = 2**32 - 1


def check(data: bytes) -> None:
    draw = atheris.FuzzedDataProvider(data)
    channel = draw.ConsumeIntInRange(1, 65535)
    max_body_frame_size = draw.ConsumeIntInRange(1, 131072)
    exchange, routing_key, message_id = (_string(draw) for _ in range(3))
    headers: dict[str, HeaderValue] = {
        _string(draw): draw.ConsumeBool() if draw.ConsumeBool() else _string(draw, 400)
        for _ in range(draw.ConsumeIntInRange(0, 6))
    }
    properties = MessageProperties(
        message_id=message_id,
        headers=headers,
        message_type=_string(draw) if draw.ConsumeBool() else None,
        timestamp=(
            draw.ConsumeIntInRange(0, MAX_SECONDS_PAMQP_READS_AS_SECONDS)
            if draw.ConsumeBool()
            else None
        ),
        content_type=_string(draw),
        delivery_mode=draw.ConsumeIntInRange(1, 2),
        app_id=_string(draw),
    )
    body = draw.ConsumeBytes(draw.remaining_bytes())
    short_strings = [exchange, routing_key, message_id, *headers, properties.content_type]
    short_strings += [properties.message_type or "", properties.app_id]
    too_long = any(len(text.encode()) > SHORT_STRING_MAX_BYTES for text in short_strings)
    try:
        encoded = encode_publish(
            channel=channel,
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            body=body,
            max_body_frame_size=max_body_frame_size,
        )
    except ValueError:
        assert too_long, "ValueError without a short string over 255 bytes"
        return
    assert not too_long, "a short string over 255 bytes was encoded"

    decoded = decode_publish(encoded, channel=channel)
    method = decoded.method
    assert (method.exchange, method.routing_key, method.mandatory) == (exchange, routing_key, True)
    assert all(len(piece) <= max_body_frame_size for piece in decoded.body_frames)
    assert decoded.body == body
    read = decoded.header.properties
    assert read.message_id == message_id
    assert (read.headers or {}) == headers
    assert read.message_type == properties.message_type
    assert read.timestamp == instant(properties.timestamp)
    assert read.content_type == properties.content_type
    assert read.delivery_mode == properties.delivery_mode
    assert read.app_id == properties.app_id


def _string(draw: atheris.FuzzedDataProvider, longest: int = 300) -> str:
    text: str = draw.ConsumeUnicodeNoSurrogates(draw.ConsumeIntInRange(0, longest))
    return text
