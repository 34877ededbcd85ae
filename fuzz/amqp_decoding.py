"""Encoded publishes read back with pamqp, the decoder aiormq and aio-pika consumers use."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pamqp.frame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader


@dataclass(frozen=True, slots=True)
class DecodedPublish:
    method: Basic.Publish
    header: ContentHeader
    body_frames: list[bytes]

    @property
    def body(self) -> bytes:
        return b"".join(self.body_frames)


def decode_publish(encoded: bytes, *, channel: int) -> DecodedPublish:
    """Split ``encoded`` into frames and check they form one publish on ``channel``."""
    frames = []
    offset = 0
    while offset < len(encoded):
        consumed, frame_channel, frame = pamqp.frame.unmarshal(encoded[offset:])
        assert consumed > 0
        assert frame_channel == channel, f"frame on channel {frame_channel}, not {channel}"
        frames.append(frame)
        offset += consumed
    method, header, *bodies = frames
    assert isinstance(method, Basic.Publish), f"first frame is {method!r}"
    assert isinstance(header, ContentHeader), f"second frame is {header!r}"
    assert all(isinstance(body, ContentBody) for body in bodies)
    body_frames = [body.value for body in bodies if isinstance(body, ContentBody)]
    assert all(body_frames), "an empty body frame"
    assert header.body_size == sum(len(piece) for piece in body_frames)
    return DecodedPublish(method, header, body_frames)


def instant(seconds: int | None) -> datetime | None:
    """A timestamp property as pamqp reads back a value sent in seconds."""
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=UTC)
