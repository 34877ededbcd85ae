"""One authentic webhook through the request path, down to the frames it publishes.

The fuzzer writes the whole request (every header, including ``traceparent`` and
``tracestate``, and the body); the harness plays OpenAI and adds the genuine
``v1`` signature to whatever ``webhook-signature`` entries the request has, so every
body is authentic and reaches classification, routing and encoding as in
``bridge.app``: verify, ``classify``, ``route``, ``encode_publish``. For each
request whose headers are well formed and fresh:

- verification accepts it (only the typed refusals for malformed or stale headers);
- the frames decode with pamqp into exactly the body received, sent to the
  quarantine exchange without a routing key when the body is malformed and to the
  entry exchange under the event type otherwise;
- the message's headers are the ones ``route`` built, carrying the three webhook
  headers exactly as received, and its id is the ``webhook-id``;
- a timestamp property, when set, reads back as the event's ``created_at`` (or the
  signed timestamp, for a body without one), in seconds.

The failures this harness found (a non-ASCII signature entry, a ``created_at`` past
what pamqp reads as seconds) are fixed; ``tests/test_fuzz_findings.py`` keeps their
reproducers.
"""

from __future__ import annotations

from dataclasses import replace

from bridge.events import classify
from bridge.frames import FRAME_OVERHEAD
from bridge.publisher import Topology, route
from bridge.signature import (
    MalformedWebhookHeaders,
    SignatureVerifier,
    TimestampOutOfTolerance,
    WebhookHeaders,
)
from bridge.tracing import TRACEPARENT, TRACESTATE, incoming_context
from fuzz.amqp_decoding import decode_publish, instant
from fuzz.webhook_input import CLOCK, GENUINE_KEY, TOLERANCE_SECONDS, genuine_signature, parse

TOPOLOGY = Topology(
    exchange="fuzz.events", unrouted_exchange="fuzz.unrouted", quarantine_exchange="fuzz.quarantine"
)
VERIFIER = SignatureVerifier(
    [GENUINE_KEY], tolerance_seconds=TOLERANCE_SECONDS, clock=lambda: CLOCK
)
CHANNEL = 1
FRAME_MAX = 131072


def check(data: bytes) -> None:
    request = parse(data)
    try:
        received = WebhookHeaders.from_mapping(request.headers)
    except MalformedWebhookHeaders:
        return
    genuine = genuine_signature(received.webhook_id, received.timestamp, request.body)
    headers = replace(received, signature=f"{received.signature} {genuine}".lstrip())
    try:
        VERIFIER.verify(headers, request.body)
    except (MalformedWebhookHeaders, TimestampOutOfTolerance):
        return

    event = classify(request.body)
    trace = incoming_context(
        request.headers.getall(TRACEPARENT, []), request.headers.getall(TRACESTATE, [])
    )
    message = route(TOPOLOGY, headers, request.body, event, trace)
    encoded = message.frames(channel=CHANNEL, max_body_frame_size=FRAME_MAX - FRAME_OVERHEAD)

    decoded = decode_publish(encoded, channel=CHANNEL)
    assert decoded.body == request.body
    destination: tuple[str, str | None] = (TOPOLOGY.quarantine_exchange, "")
    if event.kind != "malformed":
        destination = (TOPOLOGY.entry_exchange, event.event_type)
    assert (decoded.method.exchange, decoded.method.routing_key) == destination
    read = decoded.header.properties
    assert read.message_id == headers.webhook_id
    assert read.headers == dict(message.properties.headers)
    signed_headers = {
        "webhook-id": headers.webhook_id,
        "webhook-timestamp": headers.timestamp,
        "webhook-signature": headers.signature,
    }
    assert {name: read.headers[name] for name in signed_headers} == signed_headers
    if read.timestamp is not None:
        seconds = event.created_at if event.created_at is not None else int(headers.timestamp)
        assert read.timestamp == instant(seconds), f"timestamp {seconds} read as {read.timestamp}"
