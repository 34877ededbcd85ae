"""Every event type through a running bridge into real RabbitMQ queues."""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter
from collections.abc import Callable

import aio_pika
import aiohttp
import pytest

from bridge.events import KNOWN_EVENT_TYPES
from bridge.publisher import QUARANTINE_REASON_HEADER, VALIDATED_HEADER
from bridge.samples import sample_body
from tests.conftest import BridgeProcess, Broker, Signer

pytestmark = pytest.mark.broker

# Subscribable on OpenAI's endpoints, but the SDK has no model for them.
UNMODELLED_TYPES = ["video.completed", "video.failed"]


def video_body(event_type: str) -> bytes:
    event = {
        "object": "event",
        "id": f"evt_{secrets.token_hex(16)}",
        "type": event_type,
        "created_at": int(time.time()),
        "data": {"id": f"video_{secrets.token_hex(16)}"},
    }
    return json.dumps(event, separators=(",", ":")).encode()


async def post(bridge: BridgeProcess, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(bridge.url, data=body, headers=headers) as response,
    ):
        return response.status, (await response.json())["outcome"]


async def test_every_type_reaches_a_queue_bound_hash_byte_for_byte(
    start_bridge: Callable[..., BridgeProcess], broker: Broker, signer: Signer
) -> None:
    bridge = start_bridge()
    await bridge.wait_ready()
    everything = await broker.bind_queue(bridge.exchange, "#")
    sent: dict[str, tuple[str, bytes]] = {}
    for event_type in sorted(KNOWN_EVENT_TYPES) + UNMODELLED_TYPES:
        body = (
            sample_body(event_type) if event_type in KNOWN_EVENT_TYPES else video_body(event_type)
        )
        headers = signer.headers(body)
        assert await post(bridge, body, headers) == (200, "published"), event_type
        sent[headers["webhook-id"]] = (event_type, body)

    # Each 200 came after the broker's confirm, so every message is already queued.
    messages = await broker.drain(everything)

    assert len(KNOWN_EVENT_TYPES) == 31
    assert Counter(message.message_id for message in messages) == Counter(sent.keys())
    for message in messages:
        assert message.message_id is not None
        event_type, body = sent[message.message_id]
        assert message.routing_key == event_type
        assert message.type == event_type
        assert message.body == body
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.timestamp is not None
        assert int(message.timestamp.timestamp()) == json.loads(body)["created_at"]
        assert message.headers["webhook-id"] == message.message_id
        assert message.headers[VALIDATED_HEADER] is (event_type in KNOWN_EVENT_TYPES), event_type
    validated = {
        event_type for event_type, _body in sent.values() if event_type in KNOWN_EVENT_TYPES
    }
    assert validated == KNOWN_EVENT_TYPES


@pytest.mark.parametrize(
    ("event_type", "data", "reason"),
    [
        (
            "agent.session.action_required",
            {"id": "sess_1"},
            "data.required_action: Field required",
        ),
        ("agent.session.idle", {"id": "sess_1"}, "data.environment_type: Field required"),
        (
            "live.transport.incoming",
            {"session_id": "live_1", "type": "sip"},
            "data.sip_headers: Field required",
        ),
        ("live.transport.connected", {"type": "webrtc"}, "data.session_id: Field required"),
        ("safety.warning_issued", {"case_id": "C-1"}, "data.id: Field required"),
    ],
)
async def test_a_new_type_failing_its_schema_is_quarantined_not_routed(
    start_bridge: Callable[..., BridgeProcess],
    broker: Broker,
    signer: Signer,
    event_type: str,
    data: dict[str, object],
    reason: str,
) -> None:
    bridge = start_bridge()
    await bridge.wait_ready()
    everything = await broker.bind_queue(bridge.exchange, "#")
    body = json.dumps(
        {"object": "event", "id": "evt_1", "type": event_type, "created_at": 1, "data": data}
    ).encode()
    headers = signer.headers(body)

    assert await post(bridge, body, headers) == (200, "quarantined")

    [message] = await broker.drain(f"{bridge.exchange}.quarantine")
    assert message.body == body
    assert message.message_id == headers["webhook-id"]
    assert message.headers[QUARANTINE_REASON_HEADER] == (
        f"{event_type} failed schema validation: {reason}"
    )
    assert VALIDATED_HEADER not in message.headers
    assert await broker.drain(everything) == []
