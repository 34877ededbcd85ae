"""The hand-written publish encoding produces exactly pamqp's bytes."""

from __future__ import annotations

import pamqp.frame
from hypothesis import given
from hypothesis import strategies as st
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from bridge.frames import FRAME_OVERHEAD, MessageProperties, encode_publish
from tests.conftest import pamqp_properties


def pamqp_publish(
    channel: int,
    exchange: str,
    routing_key: str,
    properties: MessageProperties,
    body: bytes,
    frame_max: int,
) -> bytes:
    frames = [
        pamqp.frame.marshal(
            Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True), channel
        ),
        pamqp.frame.marshal(ContentHeader(0, len(body), pamqp_properties(properties)), channel),
    ]
    chunk = frame_max - FRAME_OVERHEAD
    frames += [
        pamqp.frame.marshal(ContentBody(body[start : start + chunk]), channel)
        for start in range(0, len(body), chunk)
    ]
    return b"".join(frames)


names = st.text(st.characters(codec="ascii", exclude_characters="\x00"), min_size=1, max_size=60)
header_values = st.one_of(st.booleans(), st.text(max_size=300))


@given(
    channel=st.integers(min_value=1, max_value=2047),
    exchange=st.from_regex(r"[A-Za-z0-9_.:-]{1,60}", fullmatch=True),
    routing_key=st.text(max_size=80),
    message_id=names,
    headers=st.dictionaries(names, header_values, max_size=6),
    message_type=st.none() | names,
    timestamp=st.none() | st.integers(min_value=0, max_value=2**35),
    body=st.binary(max_size=3000),
    frame_max=st.sampled_from([4096, 131072]),
)
def test_encoding_matches_pamqp(
    channel: int,
    exchange: str,
    routing_key: str,
    message_id: str,
    headers: dict[str, str | bool],
    message_type: str | None,
    timestamp: int | None,
    body: bytes,
    frame_max: int,
) -> None:
    # pamqp writes table entries in sorted order; ours keeps insertion order.
    sorted_headers = dict(sorted(headers.items()))
    properties = MessageProperties(
        message_id=message_id,
        headers=sorted_headers,
        message_type=message_type,
        timestamp=timestamp,
    )
    ours = encode_publish(
        channel=channel,
        exchange=exchange,
        routing_key=routing_key,
        properties=properties,
        body=body,
        max_body_frame_size=frame_max - FRAME_OVERHEAD,
    )
    assert ours == pamqp_publish(channel, exchange, routing_key, properties, body, frame_max)


def test_a_body_longer_than_a_frame_is_split() -> None:
    properties = MessageProperties(message_id="wh_1")
    body = bytes(range(256)) * 40
    encoded = encode_publish(
        channel=1,
        exchange="x",
        routing_key="a.b",
        properties=properties,
        body=body,
        max_body_frame_size=4096 - FRAME_OVERHEAD,
    )
    assert encoded == pamqp_publish(1, "x", "a.b", properties, body, 4096)
    assert encoded.count(b"\x03\x00\x01") >= 3
