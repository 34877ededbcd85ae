"""The AsyncAPI document: valid for AsyncAPI's own parser, and true to what the bridge does."""

from __future__ import annotations

import copy
import fcntl
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from bridge.app import WEBHOOK_PATH
from bridge.asyncapi import asyncapi_document, render
from bridge.cli import main
from bridge.events import EVENT_MODELS, KNOWN_EVENT_TYPES
from bridge.publisher import ArchiveRetention, Topology, declare_topology
from bridge.samples import sample_body, sample_event
from bridge.settings import DEFAULT_EXCHANGE
from tests.conftest import AiohttpClient, Broker, Signer, fresh_channel, make_settings, unique_name
from tests.test_event_types_end_to_end import video_body
from tests.test_integration import ready_client

PARSER_DIR = Path(__file__).parent / "asyncapi_parser"
DOCUMENT_URI = "urn:openai-webhook-bridge:asyncapi"
ERROR, WARNING = 0, 1
# Added by RabbitMQ, not the bridge: a quorum queue counts deliveries.
BROKER_HEADERS = {"x-delivery-count"}


@pytest.fixture(scope="module")
def parser_dir() -> Path:
    """The parser's folder with its locked packages installed (``npm ci``, the first time)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are needed to run @asyncapi/parser")
    lock_file = PARSER_DIR / "package-lock.json"
    installed = PARSER_DIR / "node_modules" / ".package-lock.json"
    with lock_file.open() as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be installing too
        if not installed.exists() or installed.stat().st_mtime < lock_file.stat().st_mtime:
            subprocess.run(
                ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=PARSER_DIR,
                check=True,
                timeout=300,
            )
    return PARSER_DIR


def parse(parser_dir: Path, *texts: str) -> list[list[dict[str, Any]]]:
    """The parser's diagnostics for each document, in one Node run."""
    result = subprocess.run(
        ["node", "validate.mjs"],
        cwd=parser_dir,
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    reports: list[list[dict[str, Any]]] = json.loads(result.stdout)
    return reports


def serious(diagnostics: list[dict[str, Any]]) -> list[str]:
    return [
        f"{'/'.join(map(str, diagnostic['path']))}: {diagnostic['message']} ({diagnostic['code']})"
        for diagnostic in diagnostics
        if diagnostic["severity"] in (ERROR, WARNING)
    ]


def test_asyncapi_parser_finds_no_error_or_warning(parser_dir: Path) -> None:
    document = asyncapi_document()
    broken = copy.deepcopy(document)
    broken["channels"]["events"]["bindings"]["amqp"]["is"] = "exchange"

    ours, broken_report = parse(parser_dir, render(document), render(broken))

    assert serious(ours) == []
    # The same parser run does see a broken AMQP binding in this document.
    assert any(
        diagnostic["severity"] == ERROR
        and diagnostic["path"][:4] == ["channels", "events", "bindings", "amqp"]
        for diagnostic in broken_report
    ), broken_report


def schema_validator(document: dict[str, Any], pointer: str) -> Draft7Validator:
    """A validator for the schema at ``pointer``, its ``$ref``s resolved in ``document``.

    Draft-07: the AsyncAPI Schema format (the document's default) is a superset of it.
    """
    registry: Registry[Any] = Registry().with_resource(
        DOCUMENT_URI, Resource.from_contents(document, default_specification=DRAFT7)
    )
    return Draft7Validator({"$ref": f"{DOCUMENT_URI}#{pointer}"}, registry=registry)


def message_name(event_type: str | None) -> str:
    if event_type is None:
        return "QuarantinedWebhook"
    model = EVENT_MODELS.get(event_type)
    return "UnknownWebhookEvent" if model is None else model.__name__


def test_every_event_type_has_a_message_whose_payload_validates_a_sample() -> None:
    document = asyncapi_document()
    messages = document["components"]["messages"]
    events = document["channels"]["events"]["messages"]
    unknown = schema_validator(document, "/components/messages/UnknownWebhookEvent/payload")

    assert {messages[name]["name"] for name in events} == KNOWN_EVENT_TYPES | {"unknown"}
    for event_type in sorted(KNOWN_EVENT_TYPES):
        name = message_name(event_type)
        message = messages[name]
        assert message["bindings"]["amqp"]["messageType"] == event_type
        sample = sample_event(event_type)
        payload = schema_validator(document, f"/components/messages/{name}/payload")
        assert list(payload.iter_errors(sample)) == [], event_type
        # Every event validates against exactly one message of the channel.
        assert not unknown.is_valid(sample), event_type
    assert list(unknown.iter_errors(json.loads(video_body("video.completed")))) == []


def test_every_exchange_and_queue_of_the_topology_is_a_channel(signer: Signer) -> None:
    settings = make_settings(signer, archive_max_age="1h")
    topology = Topology.from_settings(settings)
    channels = asyncapi_document(settings.exchange)["channels"].values()
    amqp = [channel["bindings"]["amqp"] for channel in channels]

    exchanges = {
        binding["exchange"]["name"]: binding["exchange"]["type"]
        for binding in amqp
        if binding["is"] == "routingKey"
    }
    queues = {binding["queue"]["name"] for binding in amqp if binding["is"] == "queue"}

    assert exchanges == {
        topology.exchange: "topic",
        topology.ingress_exchange: "fanout",
        topology.unrouted_exchange: "fanout",
        topology.quarantine_exchange: "fanout",
    }
    assert queues == {
        topology.unrouted_exchange,
        topology.quarantine_exchange,
        topology.archive_stream,
    }


@pytest.mark.broker
async def test_the_broker_holds_each_exchange_and_queue_as_the_document_declares(
    broker: Broker, signer: Signer
) -> None:
    settings = make_settings(signer, archive_max_age="1h")
    topology = Topology.from_settings(settings)
    broker.forget_topology(topology)
    retention = ArchiveRetention.from_settings(settings)
    assert retention is not None
    channels = asyncapi_document(settings.exchange)["channels"].values()
    async with fresh_channel() as channel:
        await declare_topology(channel, topology)

    # Declaring again with other attributes or arguments than the bridge's closes the
    # channel (PRECONDITION_FAILED): each declare here gets its own.
    for binding in (channel["bindings"]["amqp"] for channel in channels):
        arguments = dict(binding.get("x-arguments", {}))
        async with fresh_channel() as channel:
            if binding["is"] == "routingKey":
                exchange = binding["exchange"]
                await channel.declare_exchange(
                    exchange["name"],
                    aio_pika.ExchangeType(exchange["type"]),
                    durable=exchange["durable"],
                    auto_delete=exchange["autoDelete"],
                    arguments=arguments,
                )
            else:
                queue = binding["queue"]
                if queue["name"] == topology.archive_stream:
                    # Retention comes from the settings, which the document only names.
                    arguments = {**retention.stream_arguments, **arguments}
                await channel.declare_queue(
                    queue["name"],
                    durable=queue["durable"],
                    exclusive=queue["exclusive"],
                    auto_delete=queue["autoDelete"],
                    arguments=arguments,
                )


def amqp_properties(message: AbstractIncomingMessage) -> dict[str, Any]:
    """The basic properties a consumer received, named as the document names them."""
    properties = {
        "content_type": message.content_type,
        "delivery_mode": None if message.delivery_mode is None else int(message.delivery_mode),
        "message_id": message.message_id,
        "type": message.type,
        "timestamp": None if message.timestamp is None else int(message.timestamp.timestamp()),
        "app_id": message.app_id,
    }
    return {name: value for name, value in properties.items() if value is not None}


@pytest.mark.broker
async def test_what_reaches_the_queues_is_what_the_document_describes(
    aiohttp_client: AiohttpClient, broker: Broker, signer: Signer
) -> None:
    settings = make_settings(signer, archive_max_age="1h")
    broker.forget_topology(Topology.from_settings(settings))
    document = asyncapi_document(settings.exchange)
    channels = document["channels"]
    client = await ready_client(aiohttp_client, settings)
    everything = await broker.bind_queue(settings.exchange, "#")
    trace = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "vendor=value",
    }
    bodies = [sample_body(event_type) for event_type in sorted(KNOWN_EVENT_TYPES)]
    bodies += [video_body("video.completed"), b"not json"]
    for body in bodies:
        response = await client.post(WEBHOOK_PATH, data=body, headers=signer.headers(body) | trace)
        assert response.status == 200

    routed = await broker.drain(everything)
    quarantined = await broker.drain(settings.quarantine_exchange)

    assert len(routed) == len(KNOWN_EVENT_TYPES) + 1
    assert len(quarantined) == 1
    publishing = {
        "events": channels["ingress"],  # the archive is on: events enter by the ingress
        "quarantine": channels["quarantine"],
    }
    for kind, messages in (("events", routed), ("quarantine", quarantined)):
        channel = publishing[kind]
        for message in messages:
            name = message_name(message.type if kind == "events" else None)
            assert name in channel["messages"]
            pointer = f"/components/messages/{name}"
            header_schema = schema_validator(document, f"{pointer}/headers")
            property_schema = schema_validator(document, f"{pointer}/bindings/amqp/x-properties")
            headers = dict(message.headers)

            assert message.exchange == channel["bindings"]["amqp"]["exchange"]["name"]
            expected_key = channel["address"].replace("{eventType}", message.type or "")
            assert message.routing_key == expected_key
            assert list(header_schema.iter_errors(headers)) == [], name
            assert set(headers) - BROKER_HEADERS <= declared_headers(document, name), name
            assert list(property_schema.iter_errors(amqp_properties(message))) == [], name
            if kind == "events":
                payload = schema_validator(document, f"{pointer}/payload")
                assert list(payload.iter_errors(json.loads(message.body))) == [], name


def declared_headers(document: dict[str, Any], name: str) -> set[str]:
    """The names of the headers the document declares for the message ``name``."""
    schema = document
    reference: str = document["components"]["messages"][name]["headers"]["$ref"]
    for part in reference.removeprefix("#/").split("/"):
        schema = schema[part]
    return set(schema["properties"])


def test_the_document_is_the_same_for_the_same_exchange_and_uses_it() -> None:
    exchange = unique_name("billing.webhooks")

    text = render(asyncapi_document(exchange))

    assert text == render(asyncapi_document(exchange))
    assert text.endswith("}\n")
    assert DEFAULT_EXCHANGE not in text
    assert f'"name": "{exchange}"' in text
    assert render(asyncapi_document()) == render(asyncapi_document(DEFAULT_EXCHANGE))


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BRIDGE_EXCHANGE", raising=False)
    monkeypatch.setenv("BRIDGE_SECRETS_DIR", str(tmp_path))


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize(
    ("argv", "environment", "exchange"),
    [
        ([], {}, DEFAULT_EXCHANGE),
        ([], {"BRIDGE_EXCHANGE": "from.environment"}, "from.environment"),
        (["--exchange", "from.flag"], {"BRIDGE_EXCHANGE": "from.environment"}, "from.flag"),
    ],
)
def test_the_command_prints_the_document_for_the_configured_exchange(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    environment: dict[str, str],
    exchange: str,
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    assert main(["asyncapi", *argv]) == 0

    assert capsys.readouterr().out == render(asyncapi_document(exchange))
