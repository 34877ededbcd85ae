"""Fuzzer bytes read as one webhook request: header lines, a blank line, the body.

The form is HTTP's, so seeds read like requests::

    webhook-id: wh_123
    webhook-timestamp: 1750000000
    webhook-signature: v1,...

    {"type": "batch.completed", ...}

Header values are decoded as aiohttp decodes them (UTF-8 with surrogate escapes),
so every byte a client can send reaches the bridge's code as aiohttp would hand it
over. Names repeat, case varies and lines without a colon are dropped, as in a
lenient HTTP parser.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

CLOCK = 1_750_000_000
"""The harnesses' fixed "now": seeds carry timestamps near it."""

TOLERANCE_SECONDS = 300
GENUINE_KEY = bytes(range(32))
"""The fuzz-only HMAC key standing in for OpenAI's secret; public by design."""

OTHER_KEY = bytes(range(32, 64))
"""A second configured secret, as during a rotation; nothing is ever signed with it."""


@dataclass(frozen=True, slots=True)
class WebhookInput:
    headers: CIMultiDictProxy[str]
    body: bytes


def parse(data: bytes) -> WebhookInput:
    head, _, body = data.partition(b"\n\n")
    headers = CIMultiDict[str]()
    for line in head.split(b"\n"):
        name, colon, value = line.partition(b":")
        if colon and name:
            headers.add(_as_aiohttp_decodes(name), _as_aiohttp_decodes(value.strip(b" \t")))
    return WebhookInput(CIMultiDictProxy(headers), body)


def genuine_signature(webhook_id: str, timestamp: str, body: bytes) -> str:
    """The ``v1`` entry OpenAI would send for these header values, signed with
    :data:`GENUINE_KEY` over the bytes as received."""
    signed = f"{webhook_id}.{timestamp}.".encode("utf-8", "surrogateescape") + body
    digest = hmac.new(GENUINE_KEY, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _as_aiohttp_decodes(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")
