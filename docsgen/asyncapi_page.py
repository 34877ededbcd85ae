"""docs/reference/asyncapi.md and the document it links, asyncapi.json."""

from __future__ import annotations

from typing import Any

from bridge.asyncapi import asyncapi_document, render
from docsgen.markdown import code, page, prose, table

DOCUMENT_FILE = "asyncapi.json"


def render_document() -> str:
    return render(asyncapi_document())


def _channel_id(operation: dict[str, Any]) -> str:
    return str(operation["channel"]["$ref"]).rsplit("/", 1)[1]


def render_page() -> str:
    document = asyncapi_document()
    channels = table(
        ("Channel", "Address", "Description"),
        (
            [
                code(name),
                code(channel["address"]) if channel["address"] else "",
                prose(channel["description"]),
            ]
            for name, channel in document["channels"].items()
        ),
    )
    operations = table(
        ("Operation", "Action", "Channel", "Summary"),
        (
            [
                code(name),
                operation["action"],
                code(_channel_id(operation)),
                prose(operation["summary"]),
            ]
            for name, operation in document["operations"].items()
        ),
    )
    messages = ", ".join(code(name) for name in document["components"]["messages"])
    return page(
        "AsyncAPI document",
        f"[{DOCUMENT_FILE}]({DOCUMENT_FILE}) is the AsyncAPI {document['asyncapi']} document of "
        "what the bridge publishes to RabbitMQ, for the default exchange. "
        "`webhook-bridge asyncapi` prints it for another one (`--exchange`, or "
        "`BRIDGE_EXCHANGE`); feed it to AsyncAPI's tools to generate consumers or browse it. "
        "[Messages and topology](messages.md) says the same in prose and tables.",
        "## Channels",
        channels,
        "## Operations",
        operations,
        "## Messages",
        messages,
    )
