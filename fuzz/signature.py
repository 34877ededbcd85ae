"""Header parsing and signature verification: typed refusals only, and sound.

For any request:

- ``WebhookHeaders.from_mapping`` returns the three values as sent, or raises
  ``MalformedWebhookHeaders`` because one is missing;
- ``SignatureVerifier.verify`` returns a secret's index or raises one of its three
  typed refusals, never anything else;
- it accepts a request only if the header carries the genuine signature: no
  forgery passes, and nothing is ever accepted for the secret nobody signs with;
- adding the genuine signature to the header turns a ``SignatureMismatch`` into
  acceptance and changes no other answer: a malformed header or a stale timestamp
  stays refused for the same reason (a header with no entry, or already at the
  limit of entries, is left out: one more entry is what changes its answer);
- a ``TimestampOutOfTolerance`` means the timestamp is outside the tolerance.
"""

from __future__ import annotations

from dataclasses import replace

from bridge.signature import (
    MAX_SIGNATURE_ENTRIES,
    MalformedWebhookHeaders,
    SignatureMismatch,
    SignatureVerifier,
    TimestampOutOfTolerance,
    WebhookHeaders,
)
from fuzz.webhook_input import (
    CLOCK,
    GENUINE_KEY,
    OTHER_KEY,
    TOLERANCE_SECONDS,
    genuine_signature,
    parse,
)

HEADER_NAMES = ("webhook-id", "webhook-timestamp", "webhook-signature")
REFUSALS = (MalformedWebhookHeaders, SignatureMismatch, TimestampOutOfTolerance)
VERIFIER = SignatureVerifier(
    [OTHER_KEY, GENUINE_KEY], tolerance_seconds=TOLERANCE_SECONDS, clock=lambda: CLOCK
)
GENUINE_INDEX = 1

Answer = int | MalformedWebhookHeaders | SignatureMismatch | TimestampOutOfTolerance


def check(data: bytes) -> None:
    request = parse(data)
    try:
        headers = WebhookHeaders.from_mapping(request.headers)
    except MalformedWebhookHeaders:
        assert not all(name in request.headers for name in HEADER_NAMES)
        return
    as_sent = (headers.webhook_id, headers.timestamp, headers.signature)
    assert as_sent == tuple(request.headers[name] for name in HEADER_NAMES)

    answer = _answer(headers, request.body)
    genuine = genuine_signature(headers.webhook_id, headers.timestamp, request.body)
    if isinstance(answer, int):
        assert answer == GENUINE_INDEX, f"accepted for secret #{answer}, which never signs"
        assert genuine in headers.signature.split(), "accepted without the genuine signature"
    if isinstance(answer, TimestampOutOfTolerance):
        assert abs(CLOCK - int(headers.timestamp)) > TOLERANCE_SECONDS

    if not 0 < len(headers.signature.split()) < MAX_SIGNATURE_ENTRIES:
        return  # adding an entry would make the header well formed, or too long
    with_genuine = _answer(
        replace(headers, signature=f"{headers.signature} {genuine}"), request.body
    )
    if isinstance(answer, SignatureMismatch):
        assert with_genuine == GENUINE_INDEX, f"genuine signature refused: {with_genuine!r}"
    elif isinstance(answer, int):
        assert with_genuine == answer
    else:
        assert type(with_genuine) is type(answer), f"{answer!r} became {with_genuine!r}"


def _answer(headers: WebhookHeaders, body: bytes) -> Answer:
    # Any other exception, a subclass of WebhookVerificationError included, is a crash.
    try:
        return VERIFIER.verify(headers, body)
    except REFUSALS as refusal:
        return refusal
