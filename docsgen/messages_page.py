"""docs/reference/messages.md: what a published message carries, and the broker topology.

Messages are built by the bridge's own routing (:func:`bridge.publisher.route`) from a
known, an unknown and a malformed webhook; the topology by running
:func:`bridge.publisher.declare_topology` against a channel that records each declaration.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import secrets
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import aio_pika
from aio_pika.abc import AbstractChannel

from bridge.events import classify
from bridge.frames import HeaderValue, MessageProperties
from bridge.hydrate import HydrateSettings
from bridge.hydrate.topology import declare_hydration_topology
from bridge.hydrate.worker import FAILURE_HEADER, FAILURE_STATUS_HEADER, OBJECT_HEADERS
from bridge.publisher import OutgoingMessage, Topology, declare_topology, route
from bridge.settings import Settings, env_name
from bridge.signature import WebhookHeaders
from bridge.tracing import TraceContext
from docsgen.markdown import code, page, table

# The meaning of each property and header the code sets; generating the page fails when
# the code sets one that is not described here, or no longer sets one that is.
PROPERTIES = {
    "content_type": (
        "content-type",
        "The body's media type; the body is the exact bytes OpenAI sent.",
    ),
    "delivery_mode": ("delivery-mode", "`2`: persistent; stored on disk by the broker."),
    "message_id": (
        "message-id",
        "The webhook's `webhook-id`, the same for every delivery of one event.",
    ),
    "message_type": ("type", "The event's `type`, when the body has a usable one."),
    "timestamp": (
        "timestamp",
        "The event's `created_at` (else `webhook-timestamp`), in seconds; absent when out "
        "of the AMQP range.",
    ),
    "app_id": ("app-id", "Names the bridge as the publisher."),
    "headers": ("headers", "The headers below."),
}
HEADERS = {
    "webhook-id": "The Standard Webhooks header as received: the event's id.",
    "webhook-timestamp": "The Standard Webhooks header as received: seconds since the epoch.",
    "webhook-signature": "The Standard Webhooks header as received, for consumers that re-check "
    "the signature (`consume --verify`).",
    "traceparent": "W3C trace context: the request's, or a new trace when it carried none.",
    "tracestate": "W3C trace state, only when the request carried one with its `traceparent`.",
    "x-event-validated": "`true` when the body validated against its type's model; `false` for "
    "a type the bridge does not model.",
    "x-quarantine-reason": "Why the body was quarantined (never its content).",
    "x-webhook-source": "With `BRIDGE_SOURCES`: the source (OpenAI project) whose path and "
    "secret the webhook came by, e.g. `prod`. Absent without sources (one project), so "
    "messages are exactly as before; see the guide to several OpenAI projects.",
}
KINDS = ("known type", "unknown type", "quarantined")
EXAMPLE_ARCHIVE_MAX_AGE = "7D"
EXAMPLE_SOURCES = "prod,staging"

OBJECT_HEADER_MEANINGS = {
    "webhook-id": "The event's `webhook-id` (also the message's `message-id`).",
    "x-event-id": "The event's `id`.",
    "x-event-type": "The event's `type` (also the routing key).",
    "x-object-type": "The object's `object` field (`batch`, `response`, ...).",
    "x-webhook-source": "The event's source, when its message carried one.",
    "traceparent": "The event's W3C trace context, continued.",
    "tracestate": "The event's W3C trace state, when it had one.",
    "x-object-stale": "`true` only when the object never showed what its event says (a "
    "`batch.completed` whose batch was not yet `completed`).",
}
FAILURE_HEADER_MEANINGS = {
    FAILURE_HEADER: "Why the object could not be fetched: `not_found`, `forbidden`, `refused`, "
    "`server_error`, `timeout`, `not_hydratable`, `not_an_object` or `unknown_source` (no API "
    "key for the event's source).",
    FAILURE_STATUS_HEADER: "The API's HTTP status (`0`: no answer).",
}


def _body(**fields: Any) -> bytes:
    return json.dumps(
        {"id": "evt_1", "object": "event", "created_at": 1750000000, **fields}
    ).encode()


def _messages(topology: Topology) -> dict[str, OutgoingMessage]:
    headers = WebhookHeaders("wh_1", "1750000000", "v1,c2lnbmF0dXJl")
    trace = TraceContext("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "vendor=1")
    bodies = {
        "known type": _body(type="batch.completed", data={"id": "batch_1"}),
        "unknown type": _body(type="example.added_later", data={}),
        "quarantined": _body(type="batch.completed"),
    }
    return {
        kind: route(topology, headers, body, classify(body), trace, source="prod")
        for kind, body in bodies.items()
    }


def _check_described(kind: str, found: set[str], described: Mapping[str, object]) -> None:
    if found != set(described):
        raise ValueError(
            f"docsgen/messages_page.py describes the {kind} {sorted(set(described) - found)} "
            f"that the code does not set, and not {sorted(found - set(described))}"
        )


def _value(value: HeaderValue | int | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return code(str(value).lower())
    return code(value) if isinstance(value, int) or len(value) < 40 else "string"


def _properties_table(messages: Mapping[str, OutgoingMessage]) -> str:
    names = [item.name for item in dataclasses.fields(MessageProperties)]
    _check_described("properties", set(names), PROPERTIES)
    rows = []
    for name in sorted(names, key=list(PROPERTIES).index):
        amqp_name, meaning = PROPERTIES[name]
        values = [getattr(messages[kind].properties, name) for kind in KINDS]
        shown = ["" if name in ("headers", "message_id") else _value(value) for value in values]
        rows.append([code(amqp_name), *shown, meaning])
    return table(("Property", *KINDS, "Meaning"), rows)


def _headers_table(messages: Mapping[str, OutgoingMessage]) -> str:
    found = {name for message in messages.values() for name in message.properties.headers}
    _check_described("headers", found, HEADERS)
    rows = []
    for name in sorted(found, key=list(HEADERS).index):
        values = [messages[kind].properties.headers.get(name) for kind in KINDS]
        shown = [
            _value(value) if isinstance(value, bool) or value is None else "string"
            for value in values
        ]
        rows.append([code(name), *shown, HEADERS[name]])
    return table(("Header", *KINDS, "Meaning"), rows)


def _routing_table(messages: Mapping[str, OutgoingMessage]) -> str:
    rows = [
        [
            kind,
            code(messages[kind].exchange),
            code(messages[kind].routing_key) if messages[kind].routing_key else "(empty)",
        ]
        for kind in KINDS
    ]
    return table(("Webhook", "Published to", "Routing key"), rows)


@dataclass
class _Declared:
    name: str
    kind: str
    durable: bool
    arguments: Mapping[str, Any]
    bound_to: list[str] = field(default_factory=list)

    async def bind(
        self,
        source: _Declared | str,
        routing_key: str | None = None,
        *,
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        name = source.name if isinstance(source, _Declared) else source
        matched = routing_key or ", ".join(
            f"{key}={value}" for key, value in (arguments or {}).items()
        )
        self.bound_to.append(f"{name} ({matched})" if matched else name)

    async def unbind(self, source: _Declared | str, routing_key: str | None = None) -> None:
        """Only a binding left by an earlier configuration is ever unbound."""


class _RecordingChannel:
    """Records the declarations :func:`declare_topology` makes, in order."""

    def __init__(self) -> None:
        self.declared: list[_Declared] = []

    async def declare_exchange(
        self,
        name: str,
        type: aio_pika.ExchangeType = aio_pika.ExchangeType.DIRECT,  # aio-pika's name
        *,
        durable: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> _Declared:
        declared = _Declared(name, f"{type.value} exchange", durable, arguments or {})
        self.declared.append(declared)
        return declared

    async def declare_queue(
        self, name: str, *, durable: bool = False, arguments: Mapping[str, Any] | None = None
    ) -> _Declared:
        queue_type = (arguments or {}).get("x-queue-type", "classic")
        declared = _Declared(
            name, "stream" if queue_type == "stream" else "queue", durable, arguments or {}
        )
        self.declared.append(declared)
        return declared


def _declarations_table(
    declare: Callable[[AbstractChannel], Coroutine[Any, Any, object]],
) -> str:
    """What ``declare`` declares on a channel, by name."""
    channel = _RecordingChannel()
    asyncio.run(declare(cast(AbstractChannel, channel)))
    rows = [
        [
            code(declared.name),
            declared.kind,
            "durable" if declared.durable else "transient",
            "<br>".join(
                f"{code(key)}: {code(value)}" for key, value in sorted(declared.arguments.items())
            ),
            "<br>".join(code(name) for name in declared.bound_to),
        ]
        for declared in sorted(channel.declared, key=lambda declared: declared.name)
    ]
    return table(("Name", "Kind", "Durability", "Arguments", "Bound to"), rows)


def _topology_table(topology: Topology) -> str:
    return _declarations_table(lambda channel: declare_topology(channel, topology))


def _hydration_topology_table(settings: HydrateSettings) -> str:
    return _declarations_table(lambda channel: declare_hydration_topology(channel, settings))


def _hydration_headers_table() -> str:
    _check_described("object header", set(OBJECT_HEADERS), OBJECT_HEADER_MEANINGS)
    rows = [[code(name), meaning] for name, meaning in OBJECT_HEADER_MEANINGS.items()]
    rows += [[code(name), meaning] for name, meaning in FAILURE_HEADER_MEANINGS.items()]
    return table(("Header", "Meaning"), rows)


def _settings(**overrides: Any) -> Settings:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    return Settings(webhook_secret=secret, **overrides)


def render() -> str:
    topology = Topology.from_settings(_settings())
    archived = Topology.from_settings(_settings(archive_max_age=EXAMPLE_ARCHIVE_MAX_AGE))
    sourced = Topology.from_settings(Settings(sources=EXAMPLE_SOURCES))
    sourced_archived = Topology.from_settings(
        Settings(sources=EXAMPLE_SOURCES, archive_max_age=EXAMPLE_ARCHIVE_MAX_AGE)
    )
    sources_setting = f"{code(env_name('sources'))}={code(EXAMPLE_SOURCES)}"
    messages = _messages(topology)
    archive_setting = env_name("archive_max_age")
    return page(
        "Messages and topology",
        "Every authentic webhook becomes one persistent AMQP message whose body is the exact "
        "bytes OpenAI sent, published with `mandatory` set and confirmed by the broker before "
        "the bridge answers 2xx. Names below are for the default "
        f"{code(env_name('exchange'))} ({code(topology.exchange)}); every other name derives "
        "from it unless set.",
        "## Where each webhook goes",
        _routing_table(messages),
        f"With the archive on ({code(archive_setting)} or {code(env_name('archive_max_bytes'))}), "
        f"known and unknown types enter by {code(archived.entry_exchange)} instead, which feeds "
        "the topic exchange and the archive stream.",
        "## Properties",
        "Set by the bridge on every message; `—` where a kind of message leaves it out.",
        _properties_table(messages),
        "## Headers",
        _headers_table(messages),
        "## Topology",
        f"What the bridge declares at start-up (with {code(env_name('declare_topology'))} "
        f"true, the default), with {code(env_name('queue_type'))} {code(topology.queue_type)}. "
        "A message no binding routes goes to the topic exchange's alternate exchange.",
        _topology_table(topology),
        f"With the archive on (here {code(archive_setting)}={code(EXAMPLE_ARCHIVE_MAX_AGE)}):",
        _topology_table(archived),
        f"With sources (here {sources_setting}), each source's topic exchange is fed by a "
        "headers exchange on `x-webhook-source`, which the main exchange feeds with `#`: every "
        "event then has a route, its alternate exchange never fires, and an event no queue "
        "received anywhere comes back to the bridge (it is published `mandatory`), which "
        "stores it in the unrouted queue. See the guide to several OpenAI projects.",
        _topology_table(sourced),
        "With sources and the archive on, the ingress exchange feeds the headers exchange "
        "instead, and the main exchange keeps its alternate exchange: the unrouted queue then "
        "holds what no queue bound to the main exchange received.",
        _topology_table(sourced_archived),
        "## Hydrated objects",
        "`webhook-bridge hydrate` ([Hydration](../explanation/hydration.md)) publishes the "
        "object behind each hydratable event to the topic exchange `<exchange>.objects`: "
        "the API's exact bytes, persistent, `mandatory`, confirmed, with the event's type as "
        "routing key and `type`, `content-type` `application/json`, and these headers. A "
        "failure record on `<exchange>.objects.failed` is the event's message (bytes, "
        "properties and headers) with the last two added.",
        _hydration_headers_table(),
        f"What the worker declares at start-up (with {code(env_name('declare_topology'))} true):",
        _hydration_topology_table(
            HydrateSettings(openai_api_key="sk-documentation", hydrate_metrics_port=0)
        ),
    )
