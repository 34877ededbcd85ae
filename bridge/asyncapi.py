"""The AsyncAPI 3.0 document of what the bridge publishes to RabbitMQ.

How AsyncAPI 3.0.0 and its AMQP bindings (0.3.0) describe the bridge:

- A channel is an exchange the bridge publishes to, or a queue the broker fills from
  one. With the binding's ``is: routingKey`` the channel's ``address`` is the routing key
  and its binding names the exchange; with ``is: queue`` the address is the queue's name.
- The bridge makes one publish per webhook, with the event's ``type`` as routing key. So
  each exchange is one channel whose address is the expression ``{eventType}``, a
  parameter read from ``$message.payload#/type``, carrying one message per modelled type
  and one for the types OpenAI adds later. A channel per routing key would list the same
  31 keys once per exchange (topic, ingress, unrouted) and still need this form for the
  types no one knows yet.
- The bridge is the sender: one ``send`` operation per exchange it publishes to. The
  queues (unrouted, quarantine, archive stream) are channels without an operation: the
  broker fills them, consumers and replays read them.
- AMQP properties go where the binding puts them: ``contentType`` on the message,
  ``messageType`` in the message binding, delivery mode, ``mandatory`` and ``timestamp``
  in the operation binding. The binding has no field for ``message_id`` and ``app_id``,
  nor for exchange and queue arguments: the binding extensions ``x-properties`` (a JSON
  Schema of every basic property a message carries, in ``components/schemas``) and
  ``x-arguments`` hold them.
- Payloads are the event models' JSON Schema (pydantic, validation mode) in AsyncAPI's
  default schema format, a superset of JSON Schema draft-07 (the models use nothing
  newer). Their definitions live in ``components/schemas``, so every ``$ref`` resolves
  inside the document.
"""

from __future__ import annotations

import json
from importlib.metadata import metadata
from typing import Any

from aio_pika.abc import ExchangeType
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from yarl import URL

from bridge.events import EVENT_MODELS, EVENT_TYPE_PATTERN, UnknownWebhookEvent
from bridge.frames import MessageProperties
from bridge.nodes import node_address
from bridge.publisher import (
    QUARANTINE_REASON_HEADER,
    VALIDATED_HEADER,
    ArchiveRetention,
    Topology,
)
from bridge.settings import DEFAULT_EXCHANGE, Settings, env_name
from bridge.signature import MAX_WEBHOOK_ID_LENGTH
from bridge.sources import SOURCE_HEADER, SOURCE_NAME
from bridge.tracing import MAX_TRACESTATE_LENGTH, TRACEPARENT, TRACESTATE

__all__ = ["asyncapi_document", "render"]

DISTRIBUTION = "openai-webhook-bridge"
ASYNCAPI_VERSION = "3.0.0"
AMQP_BINDING_VERSION = "0.3.0"
VHOST = "/"
EVENT_TYPE_PARAMETER = "eventType"
UNKNOWN_EVENT = "UnknownWebhookEvent"
QUARANTINED_WEBHOOK = "QuarantinedWebhook"

_SCHEMAS = "#/components/schemas/"
_MESSAGES = "#/components/messages/"
# What every message's AMQP basic properties share: content type, delivery mode, app id.
_PROPERTIES = MessageProperties(message_id="")


def asyncapi_document(exchange: str = DEFAULT_EXCHANGE) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of the messages the bridge publishes to ``exchange``
    and to the exchanges and queues named after it."""
    topology = Topology(exchange, f"{exchange}.unrouted", f"{exchange}.quarantine")
    package = metadata(DISTRIBUTION)
    event_messages = [EVENT_MODELS[name].__name__ for name in sorted(EVENT_MODELS)]
    event_messages.append(UNKNOWN_EVENT)
    every_message = [*event_messages, QUARANTINED_WEBHOOK]
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": DISTRIBUTION,
            "version": package["Version"],
            "description": (
                f"{package['Summary']}\n\n"
                "Every message's body is the exact bytes of an authentic webhook request, "
                "never re-serialised; its headers carry OpenAI's signature, so a consumer "
                "can verify it again. Authentic, well-formed events go to the topic "
                f"exchange `{topology.exchange}` with their `type` as routing key (through "
                f"`{topology.ingress_exchange}` when the archive is on); events no queue "
                f"binds end up in `{topology.unrouted_exchange}`; authentic but malformed "
                f"ones in `{topology.quarantine_exchange}`."
            ),
            "license": {"name": package["License-Expression"]},
        },
        "defaultContentType": _PROPERTIES.content_type,
        "servers": {"broker": _broker_server()},
        "channels": _channels(topology, event_messages, every_message),
        "operations": _operations(event_messages),
        "components": {
            "schemas": _schemas(),
            "messages": _messages(),
            "parameters": {EVENT_TYPE_PARAMETER: _event_type_parameter()},
            "securitySchemes": {
                "amqpUser": {
                    "type": "userPassword",
                    "description": f"The user and password in {env_name('amqp_url')}.",
                }
            },
        },
    }


def render(document: dict[str, Any]) -> str:
    """``document`` as JSON, two-space indented, in the order it was built, ending in a newline."""
    return json.dumps(document, indent=2) + "\n"


def _broker_server() -> dict[str, Any]:
    default_url = URL(Settings.model_fields["amqp_url"].get_default().get_secret_value())
    return {
        "host": node_address(default_url),
        "protocol": "amqp",
        "protocolVersion": "0.9.1",
        "description": (
            f"An example: the bridge's default broker. {env_name('amqp_url')} names the "
            "real one (`amqps://` for TLS; several comma-separated nodes of one cluster)."
        ),
        "security": [{"$ref": "#/components/securitySchemes/amqpUser"}],
    }


def _channels(
    topology: Topology, event_messages: list[str], every_message: list[str]
) -> dict[str, Any]:
    routed_by_type = f"{{{EVENT_TYPE_PARAMETER}}}"
    return {
        "events": _exchange_channel(
            routed_by_type,
            topology.exchange,
            ExchangeType.TOPIC,
            "Every authentic, well-formed event, with its type as routing key: bind a queue "
            "with a pattern (`batch.*`, `response.completed`, `#`). An event no queue binds "
            f"goes to the alternate exchange `{topology.unrouted_exchange}`.",
            event_messages,
            arguments={"alternate-exchange": topology.unrouted_exchange},
        ),
        "ingress": _exchange_channel(
            routed_by_type,
            topology.ingress_exchange,
            ExchangeType.FANOUT,
            f"Only with the archive on ({env_name('archive_max_age')} or "
            f"{env_name('archive_max_bytes')}): the bridge publishes well-formed events here, "
            f"and this exchange hands each one to `{topology.exchange}` (exchange to exchange) "
            f"and to the stream `{topology.archive_stream}`.",
            event_messages,
        ),
        "unrouted": _exchange_channel(
            routed_by_type,
            topology.unrouted_exchange,
            ExchangeType.FANOUT,
            f"The alternate exchange of `{topology.exchange}`: events no queue binds, with "
            "their routing key kept. The bridge publishes here itself only when the broker "
            "returns an event as unroutable (the `alternate-exchange` argument is missing).",
            event_messages,
        ),
        "unroutedQueue": _queue_channel(
            topology.unrouted_exchange,
            f"Bound to the exchange `{topology.unrouted_exchange}`: events waiting for a "
            "consumer that binds them; `webhook-bridge replay` republishes them.",
            event_messages,
            arguments={"x-queue-type": topology.queue_type},
        ),
        "quarantine": _exchange_channel(
            "",
            topology.quarantine_exchange,
            ExchangeType.FANOUT,
            "Authentic (correctly signed) but malformed webhooks, with an empty routing key: "
            "never on the main exchange.",
            [QUARANTINED_WEBHOOK],
        ),
        "quarantineQueue": _queue_channel(
            topology.quarantine_exchange,
            f"Bound to the exchange `{topology.quarantine_exchange}`.",
            [QUARANTINED_WEBHOOK],
            arguments={"x-queue-type": topology.queue_type},
        ),
        "archive": _queue_channel(
            topology.archive_stream,
            "Only with the archive on: a stream bound to the ingress and the quarantine "
            "exchanges, holding every accepted event for as long as "
            f"{env_name('archive_max_age')} (`x-max-age`) and "
            f"{env_name('archive_max_bytes')} (`x-max-length-bytes`) say. "
            "`webhook-bridge consume --since` and `replay --from archive` read it.",
            every_message,
            arguments=dict(ArchiveRetention().stream_arguments),
        ),
    }


def _exchange_channel(
    address: str,
    exchange: str,
    exchange_type: ExchangeType,
    description: str,
    message_names: list[str],
    *,
    arguments: dict[str, str] | None = None,
) -> dict[str, Any]:
    binding: dict[str, Any] = {
        "is": "routingKey",
        "exchange": {
            "name": exchange,
            "type": exchange_type.value,
            "durable": True,
            "autoDelete": False,
            "vhost": VHOST,
        },
        "bindingVersion": AMQP_BINDING_VERSION,
    }
    if arguments:
        binding["x-arguments"] = arguments
    channel: dict[str, Any] = {
        "address": address,
        "title": exchange,
        "description": f"The {exchange_type.value} exchange `{exchange}`. {description}",
        "messages": _message_refs(message_names),
    }
    if address:
        channel["parameters"] = {
            EVENT_TYPE_PARAMETER: {"$ref": f"#/components/parameters/{EVENT_TYPE_PARAMETER}"}
        }
    channel["bindings"] = {"amqp": binding}
    return channel


def _queue_channel(
    queue: str, description: str, message_names: list[str], *, arguments: dict[str, Any]
) -> dict[str, Any]:
    return {
        "address": queue,
        "title": queue,
        "description": f"The durable queue `{queue}`. {description}",
        "messages": _message_refs(message_names),
        "bindings": {
            "amqp": {
                "is": "queue",
                "queue": {
                    "name": queue,
                    "durable": True,
                    "exclusive": False,
                    "autoDelete": False,
                    "vhost": VHOST,
                },
                "bindingVersion": AMQP_BINDING_VERSION,
                "x-arguments": arguments,
            }
        },
    }


def _message_refs(message_names: list[str]) -> dict[str, Any]:
    return {name: {"$ref": _MESSAGES + name} for name in message_names}


def _operations(event_messages: list[str]) -> dict[str, Any]:
    def send(channel: str, summary: str, message_names: list[str]) -> dict[str, Any]:
        return {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel}"},
            "summary": summary,
            "bindings": {
                "amqp": {
                    "deliveryMode": _PROPERTIES.delivery_mode,
                    "mandatory": True,
                    "timestamp": True,
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
            "messages": [
                {"$ref": f"#/channels/{channel}/messages/{name}"} for name in message_names
            ],
        }

    return {
        "publishEvent": send(
            "events",
            "Publish an authentic, well-formed event, with its type as routing key "
            "(archive off). A 2xx answer to OpenAI waits for the broker's confirm.",
            event_messages,
        ),
        "publishEventThroughIngress": send(
            "ingress",
            "Publish an authentic, well-formed event, with its type as routing key "
            "(archive on). A 2xx answer to OpenAI waits for the broker's confirm.",
            event_messages,
        ),
        "publishUnroutableEvent": send(
            "unrouted",
            "Publish an event the broker returned as unroutable, with its routing key kept.",
            event_messages,
        ),
        "quarantineWebhook": send(
            "quarantine",
            "Publish an authentic webhook whose body is not a well-formed event.",
            [QUARANTINED_WEBHOOK],
        ),
    }


def _event_type_parameter() -> dict[str, Any]:
    return {
        "description": (
            "The event's `type`: one of the modelled types, or a type OpenAI added later "
            f"(dotted lowercase words, `{EVENT_TYPE_PATTERN}`, at most 255 characters)."
        ),
        "examples": sorted(EVENT_MODELS),
        "location": "$message.payload#/type",
    }


def _schemas() -> dict[str, Any]:
    models: list[type[BaseModel]] = [*EVENT_MODELS.values(), UnknownWebhookEvent]
    _, definitions = models_json_schema(
        [(model, "validation") for model in models], ref_template=_SCHEMAS + "{model}"
    )
    schemas: dict[str, Any] = dict(sorted(definitions["$defs"].items()))
    schemas["KnownEventHeaders"] = _headers(
        "The AMQP headers of a modelled event, validated against its model.",
        {VALIDATED_HEADER: {"type": "boolean", "const": True, "description": "Validated."}},
    )
    schemas["UnknownEventHeaders"] = _headers(
        "The AMQP headers of an event of a type the bridge does not model: only its "
        "envelope was checked.",
        {
            VALIDATED_HEADER: {
                "type": "boolean",
                "const": False,
                "description": "Not validated: the bridge has no model of this type.",
            }
        },
    )
    schemas["QuarantinedWebhookHeaders"] = _headers(
        "The AMQP headers of a quarantined webhook.",
        {
            QUARANTINE_REASON_HEADER: {
                "type": "string",
                "description": "Why the body is malformed, such as `body is not valid JSON`; "
                "names no body content except the event type.",
            }
        },
    )
    schemas["EventProperties"] = _properties(
        "The AMQP basic properties of an event (pamqp's names); `type` is the routing key "
        "and the payload's `type`.",
        {"type": "string", "pattern": EVENT_TYPE_PATTERN},
        type_required=True,
    )
    schemas["QuarantinedWebhookProperties"] = _properties(
        "The AMQP basic properties of a quarantined webhook (pamqp's names).",
        {"type": "string", "description": "The event type, when the body has a readable one."},
        type_required=False,
    )
    return schemas


def _headers(description: str, kind_headers: dict[str, Any]) -> dict[str, Any]:
    headers: dict[str, Any] = {
        "webhook-id": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_WEBHOOK_ID_LENGTH,
            "description": "As received from OpenAI: the delivery's id, the same on every "
            "retry of one event (also the `message_id` property: deduplicate on it).",
        },
        "webhook-timestamp": {
            "type": "string",
            "pattern": "^[0-9]{1,12}$",
            "description": "As received: the Unix time in seconds OpenAI signed at.",
        },
        "webhook-signature": {
            "type": "string",
            "description": "As received: space-separated `v1,<base64>` HMAC-SHA256 "
            "signatures of `{webhook-id}.{webhook-timestamp}.{body}` (Standard Webhooks); "
            "verify them again with the endpoint's secret.",
        },
        TRACEPARENT: {
            "type": "string",
            "pattern": "^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
            "description": "W3C trace context: the request's own, continued, or a new trace "
            "when it had none or an invalid one.",
        },
        TRACESTATE: {
            "type": "string",
            "maxLength": MAX_TRACESTATE_LENGTH,
            "description": "W3C trace state, only when the request sent one.",
        },
        SOURCE_HEADER: {
            "type": "string",
            "pattern": SOURCE_NAME.pattern.join("^$"),
            "description": "With BRIDGE_SOURCES only: the source (OpenAI project) whose path "
            "and secret the webhook came by; the same events are also routed by type on the "
            "topic exchange `<exchange>.source.<name>`. Not signed: verify with that source's "
            "secrets, which belong to no other source.",
        },
        **kind_headers,
    }
    return {
        "type": "object",
        "description": f"{description} RabbitMQ may add its own, such as `x-delivery-count` "
        "on a quorum queue and `x-death` after dead-lettering.",
        "properties": headers,
        "required": sorted(name for name in headers if name not in (TRACESTATE, SOURCE_HEADER)),
    }


def _messages() -> dict[str, Any]:
    messages = {
        model.__name__: _message(
            name=event_type,
            summary=_first_line(model.__doc__),
            headers="KnownEventHeaders",
            payload={"$ref": _SCHEMAS + model.__name__},
            properties="EventProperties",
            message_type=event_type,
        )
        for event_type, model in sorted(EVENT_MODELS.items())
    }
    messages[UNKNOWN_EVENT] = _message(
        name="unknown",
        summary="An event of a type the bridge does not model (yet), forwarded with its "
        "envelope checked; its type is its routing key and `type` property.",
        headers="UnknownEventHeaders",
        payload={
            "allOf": [
                {"$ref": _SCHEMAS + UNKNOWN_EVENT},
                {"properties": {"type": {"not": {"enum": sorted(EVENT_MODELS)}}}},
            ]
        },
        properties="EventProperties",
    )
    messages[QUARANTINED_WEBHOOK] = _message(
        name="quarantined",
        summary="An authentic webhook whose body is not a well-formed event: not JSON, not "
        "an object, no usable `type`, or a modelled type failing its schema.",
        headers="QuarantinedWebhookHeaders",
        payload={"description": "The request's exact bytes, which may not even be JSON."},
        properties="QuarantinedWebhookProperties",
    )
    return messages


def _message(
    *,
    name: str,
    summary: str,
    headers: str,
    payload: dict[str, Any],
    properties: str,
    message_type: str | None = None,
) -> dict[str, Any]:
    amqp: dict[str, Any] = {} if message_type is None else {"messageType": message_type}
    amqp["bindingVersion"] = AMQP_BINDING_VERSION
    amqp["x-properties"] = {"$ref": _SCHEMAS + properties}
    return {
        "name": name,
        "title": name,
        "summary": summary,
        "contentType": _PROPERTIES.content_type,
        "headers": {"$ref": _SCHEMAS + headers},
        "payload": payload,
        "bindings": {"amqp": amqp},
    }


def _properties(
    description: str, event_type: dict[str, Any], *, type_required: bool
) -> dict[str, Any]:
    """The AMQP basic properties of a message (pamqp's names) as a JSON Schema."""
    properties: dict[str, Any] = {
        "content_type": {"type": "string", "const": _PROPERTIES.content_type},
        "delivery_mode": {
            "type": "integer",
            "const": _PROPERTIES.delivery_mode,
            "description": "Persistent.",
        },
        "message_id": {
            "type": "string",
            "description": "The `webhook-id` header: deduplicate on it.",
        },
        "type": event_type,
        "timestamp": {
            "type": "integer",
            "minimum": 0,
            "description": "The event's `created_at` (for a quarantined webhook without one, "
            "its `webhook-timestamp`), in seconds; left out when negative or past 2^32 - 1, "
            "which pamqp-based clients would read as milliseconds.",
        },
        "app_id": {"type": "string", "const": _PROPERTIES.app_id},
    }
    return {
        "type": "object",
        "description": description,
        "properties": properties,
        "required": ["content_type", "delivery_mode", "message_id", "app_id"]
        + (["type"] if type_required else []),
    }


def _first_line(docstring: str | None) -> str:
    return (docstring or "").strip().splitlines()[0]
