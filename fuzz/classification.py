"""Body classification: never raises, and agrees with parsing.

For any body, ``classify`` returns a ``Classified`` and ``parse_event`` either
returns an event or raises ``ValidationError``, and the two agree:

- a known event: ``parse_event`` gives the modelled event of that type and
  ``created_at``;
- an unknown event: ``parse_event`` gives the envelope, whose type is not modelled
  and is a usable topic routing key (dotted lowercase words, at most 255 bytes);
- a malformed body: ``parse_event`` refuses it, and the reason is short and set.
"""

from __future__ import annotations

import re

from pydantic import ValidationError

from bridge.events import (
    EVENT_MODELS,
    EVENT_TYPE_MAX_LENGTH,
    EVENT_TYPE_PATTERN,
    Classified,
    UnknownWebhookEvent,
    classify,
    parse_event,
)

REASON_MAX_LENGTH = 200
ROUTING_KEY = re.compile(EVENT_TYPE_PATTERN)


def check(data: bytes) -> None:
    outcome = classify(data)
    assert isinstance(outcome, Classified)
    try:
        event = parse_event(data)
    except ValidationError:
        assert outcome.kind == "malformed", f"parse_event refused a {outcome.kind} body"
        assert outcome.reason
        assert len(outcome.reason) <= REASON_MAX_LENGTH
        return

    assert outcome.kind != "malformed", f"parse_event accepted a body classified {outcome}"
    assert outcome.reason is None
    assert (outcome.event_type, outcome.created_at) == (event.type, event.created_at)
    assert ROUTING_KEY.fullmatch(event.type)
    assert len(event.type.encode()) <= EVENT_TYPE_MAX_LENGTH
    if isinstance(event, UnknownWebhookEvent):
        assert outcome.kind == "unknown"
        assert event.type not in EVENT_MODELS
    else:
        assert outcome.kind == "known"
        assert isinstance(event, EVENT_MODELS[event.type])
