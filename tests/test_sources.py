"""Sources (BRIDGE_SOURCES): each project's path and secrets, its label downstream, the
exchange of its own next to the shared one, and the unrouted guarantee across both."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractIncomingMessage

from bridge.app import WEBHOOK_PATH, create_app
from bridge.archive import ArchiveFollower
from bridge.publisher import ArchiveRetention, Topology, declare_topology
from bridge.samples import sample_body
from bridge.settings import Settings, SettingsError, load_settings
from bridge.sources import SOURCE_HEADER, parse_source_names, source_exchange_name
from tests.conftest import (
    AMQP_URL,
    AiohttpClient,
    BridgeProcess,
    Broker,
    Client,
    Signer,
    load_test_settings,
    new_secret,
    post_webhook,
    unique_name,
)
from tests.test_deploy import (
    DEFINITIONS,
    DEPLOY,
    ImportedDefinitions,
    _compose,
    _import_definitions,
    _load_all,
    _rabbitmqctl,
    kustomize_overlay,
)
from tests.test_endpoints import Outcome as EndpointsOutcome
from tests.test_endpoints import RunningStandIn, endpoints, standin  # noqa: F401  # fixtures
from tests.test_integration import wait_until_ready

SOURCES = ("prod", "staging", "team-b")


@dataclass
class Projects:
    """Three OpenAI projects, each with its own secret, in a secrets directory."""

    secrets_dir: Path
    signers: dict[str, Signer]

    def secret_file(self, source: str) -> Path:
        return self.secrets_dir / source / "BRIDGE_WEBHOOK_SECRET"

    def write(self, source: str, text: str) -> None:
        self.secret_file(source).write_text(text + "\n")


@pytest.fixture
def projects(tmp_path: Path) -> Projects:
    secrets_dir = tmp_path / "secrets"
    signers = {source: Signer() for source in SOURCES}
    for source, signer in signers.items():
        (secrets_dir / source).mkdir(parents=True)
        (secrets_dir / source / "BRIDGE_WEBHOOK_SECRET").write_text(signer.secret + "\n")
    return Projects(secrets_dir, signers)


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith("BRIDGE_"):
            monkeypatch.delenv(name)


def source_settings(projects: Projects, **overrides: object) -> Settings:
    return load_test_settings(projects.secrets_dir, **{"sources": ",".join(SOURCES), **overrides})


def forget_source_topology(broker: Broker, topology: Topology) -> None:
    broker.forget_topology(topology)
    broker.created_exchanges += [topology.sources_exchange]
    broker.created_exchanges += [topology.source_exchange(name) for name in topology.sources]


def new_sourced_topology(broker: Broker) -> Topology:
    """The default names of a new exchange with every source, forgotten after the test."""
    exchange = unique_name("test.webhooks")
    topology = Topology(exchange, f"{exchange}.unrouted", f"{exchange}.quarantine", sources=SOURCES)
    forget_source_topology(broker, topology)
    return topology


# --- Configuration -------------------------------------------------------------------------


def test_each_source_reads_its_variable_or_its_file(
    projects: Projects, clean_environment: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_environment = new_secret()
    monkeypatch.setenv("BRIDGE_WEBHOOK_SECRET_TEAM_B", from_environment)
    settings = source_settings(projects)
    assert settings.sources == SOURCES
    by_name = {source.name: source for source in settings.source_secrets}
    assert by_name["prod"].secret.get_secret_value() == projects.signers["prod"].secret
    assert by_name["prod"].origin.path == projects.secret_file("prod")
    assert by_name["team-b"].secret.get_secret_value() == from_environment
    assert by_name["team-b"].origin.path is None  # fixed for the process
    assert settings.signing_keys == ()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            "missing",
            "source 'staging' has no webhook secret: set BRIDGE_WEBHOOK_SECRET_STAGING, or write",
        ),
        ("malformed", "BRIDGE_SOURCES source 'Prod' is not a valid name"),
        ("too long", "BRIDGE_SOURCES source #2 is not a valid name"),
        ("twice", "BRIDGE_SOURCES source 'prod' is named twice"),
        ("shared", "sources 'prod' and 'staging' share a webhook secret"),
        ("undecodable", "source 'prod': "),
        ("stray variable", "environment variable BRIDGE_WEBHOOK_SECRET_QA names no source"),
        ("stray directory", "names no source in BRIDGE_SOURCES"),
        ("single secret too", "BRIDGE_WEBHOOK_SECRET is set with BRIDGE_SOURCES"),
    ],
)
def test_start_up_refusals_are_one_line(
    projects: Projects, tmp_path: Path, change: str, message: str
) -> None:
    """``serve`` stops with one line naming what to do, for every refusal of the sources."""
    sources = ",".join(SOURCES)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("BRIDGE_")}
    if change == "missing":
        projects.secret_file("staging").unlink()
    elif change == "malformed":
        sources = "Prod,staging"
    elif change == "too long":
        sources = "prod," + "x" * 80
    elif change == "twice":
        sources = "prod,staging,prod"
    elif change == "shared":
        projects.write("staging", f"{new_secret()},{projects.signers['prod'].secret}")
    elif change == "undecodable":
        projects.write("prod", "whsec_c2hvcnQ=")
    elif change == "stray variable":
        environment["BRIDGE_WEBHOOK_SECRET_QA"] = new_secret()
    elif change == "stray directory":
        (projects.secrets_dir / "qa").mkdir()
    elif change == "single secret too":
        environment["BRIDGE_WEBHOOK_SECRET"] = new_secret()
    environment.update(
        BRIDGE_SOURCES=sources,
        BRIDGE_SECRETS_DIR=str(projects.secrets_dir),
        BRIDGE_AMQP_URL=AMQP_URL,
    )
    refused = subprocess.run(
        [sys.executable, "-m", "bridge", "serve"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert message in lines[0]
    for signer in projects.signers.values():
        assert signer.secret.removeprefix("whsec_") not in refused.stderr


def test_without_sources_the_single_secret_is_still_required(
    clean_environment: None, tmp_path: Path
) -> None:
    with pytest.raises(SettingsError, match="BRIDGE_WEBHOOK_SECRET is required"):
        load_settings(secrets_dir=tmp_path)


# --- Ingress and routing on the broker --------------------------------------------------------


@pytest.fixture
async def sourced(
    aiohttp_client: AiohttpClient, projects: Projects, broker: Broker, clean_environment: None
) -> tuple[Client, Settings, Topology]:
    return await start_sourced_app(aiohttp_client, projects, broker)


async def start_sourced_app(
    aiohttp_client: AiohttpClient, projects: Projects, broker: Broker, **overrides: object
) -> tuple[Client, Settings, Topology]:
    """A ready bridge app serving every source, its topology forgotten after the test."""
    settings = source_settings(projects, **overrides)
    topology = Topology.from_settings(settings)
    forget_source_topology(broker, topology)
    client = await aiohttp_client(create_app(settings))
    await wait_until_ready(client)
    return client, settings, topology


async def post(client: Client, path: str, signer: Signer, body: bytes) -> int:
    response = await client.post(path, data=body, headers=signer.headers(body))
    return response.status


async def drained(broker: Broker, *queues: str) -> dict[str, list[AbstractIncomingMessage]]:
    return {queue: await broker.drain(queue) for queue in queues}


@pytest.mark.broker
async def test_each_source_reaches_the_main_exchange_and_its_own_labelled(
    sourced: tuple[Client, Settings, Topology], broker: Broker, projects: Projects
) -> None:
    client, settings, topology = sourced
    everyone = await broker.bind_queue(settings.exchange, "batch.*")
    prod_only = await broker.bind_queue(topology.source_exchange("prod"), "batch.*")
    staging_all = await broker.bind_queue(topology.source_exchange("staging"), "#")
    sent: dict[str, bytes] = {}
    for source in ("prod", "staging"):
        body = sample_body("batch.completed").replace(b"{", b"{ ", 1)
        sent[source] = body
        assert await post(client, f"{WEBHOOK_PATH}/{source}", projects.signers[source], body) == 200

    got = await drained(broker, everyone, prod_only, staging_all, topology.unrouted_exchange)
    assert sorted(
        (str(message.headers[SOURCE_HEADER]), message.body) for message in got[everyone]
    ) == sorted(sent.items())
    for queue, source in ((prod_only, "prod"), (staging_all, "staging")):
        [message] = got[queue]
        assert message.body == sent[source]
        assert message.routing_key == "batch.completed"
        assert message.headers[SOURCE_HEADER] == source
        assert message.message_id is not None
    assert got[topology.unrouted_exchange] == []


@pytest.mark.broker
async def test_forged_unknown_and_source_less_requests_publish_nothing(
    sourced: tuple[Client, Settings, Topology], broker: Broker, projects: Projects
) -> None:
    client, settings, topology = sourced
    everyone = await broker.bind_queue(settings.exchange, "#")
    per_source = [await broker.bind_queue(topology.source_exchange(name), "#") for name in SOURCES]
    body = sample_body("batch.completed")
    # Signed by staging's secret, posted as prod: the source is not provable, so refused.
    assert await post(client, f"{WEBHOOK_PATH}/prod", projects.signers["staging"], body) == 401
    assert await post(client, f"{WEBHOOK_PATH}/qa", projects.signers["prod"], body) == 404
    assert await post(client, WEBHOOK_PATH, projects.signers["prod"], body) == 404
    response = await client.post(f"{WEBHOOK_PATH}/qa", data=body)
    assert (await response.json())["error"] == "unknown_source"

    got = await drained(broker, everyone, *per_source, topology.unrouted_exchange)
    assert all(messages == [] for messages in got.values())
    exposition = (await (await client.get("/metrics")).read()).decode()
    assert 'webhook_bridge_requests_total{outcome="unauthorized",source="prod"} 1.0' in exposition
    assert 'webhook_bridge_requests_total{outcome="unknown_source",source=""} 3.0' in exposition


@pytest.mark.broker
async def test_the_same_webhook_id_is_one_event_per_source(
    sourced: tuple[Client, Settings, Topology], broker: Broker, projects: Projects
) -> None:
    client, settings, _topology = sourced
    everyone = await broker.bind_queue(settings.exchange, "#")
    body = sample_body("batch.completed")
    for source in ("prod", "staging", "prod"):
        headers = projects.signers[source].headers(body, webhook_id="wh_same")
        assert (await client.post(f"{WEBHOOK_PATH}/{source}", data=body, headers=headers)).ok
    messages = await broker.drain(everyone)
    assert sorted(str(message.headers[SOURCE_HEADER]) for message in messages) == [
        "prod",
        "staging",
    ]


@pytest.mark.broker
async def test_malformed_events_are_quarantined_with_their_source(
    sourced: tuple[Client, Settings, Topology], broker: Broker, projects: Projects
) -> None:
    client, _settings, topology = sourced
    body = b'{"type": "batch.completed"}'
    assert await post(client, f"{WEBHOOK_PATH}/team-b", projects.signers["team-b"], body) == 200
    message = await broker.get(topology.quarantine_exchange)
    assert message.body == body
    assert message.headers[SOURCE_HEADER] == "team-b"


# --- The unrouted guarantee -----------------------------------------------------------------


async def unrouted_case(
    client: Client, broker: Broker, projects: Projects, topology: Topology
) -> dict[str, list[str]]:
    """Post one event of a type bound only on prod's exchange from prod and from staging,
    and one bound only on the main exchange; the ids each queue holds afterwards."""
    prod_only = await broker.bind_queue(topology.source_exchange("prod"), "fine_tuning.#")
    everyone = await broker.bind_queue(topology.exchange, "batch.*")
    ids: dict[str, str] = {}
    for name, source, event_type in (
        ("prod fine-tuning", "prod", "fine_tuning.job.succeeded"),
        ("staging fine-tuning", "staging", "fine_tuning.job.succeeded"),
        ("staging batch", "staging", "batch.completed"),
    ):
        body = sample_body(event_type)
        headers = projects.signers[source].headers(body)
        ids[name] = headers["webhook-id"]
        response = await client.post(f"{WEBHOOK_PATH}/{source}", data=body, headers=headers)
        assert response.status == 200
    got = await drained(broker, prod_only, everyone, topology.unrouted_exchange)
    names = {webhook_id: name for name, webhook_id in ids.items()}
    return {
        queue: sorted(names[message.message_id or ""] for message in messages)
        for queue, messages in zip(("prod only", "everyone", "unrouted"), got.values(), strict=True)
    }


@pytest.mark.broker
async def test_unrouted_holds_exactly_what_no_queue_received(
    sourced: tuple[Client, Settings, Topology], broker: Broker, projects: Projects
) -> None:
    """Both ways: received by a queue on a source exchange only, it is not unrouted; received
    by no queue on any exchange, it is; received on the main exchange only, it is not."""
    client, _settings, topology = sourced
    assert await unrouted_case(client, broker, projects, topology) == {
        "prod only": ["prod fine-tuning"],
        "everyone": ["staging batch"],
        "unrouted": ["staging fine-tuning"],
    }


@pytest.mark.broker
async def test_with_the_archive_unrouted_counts_the_main_exchange_only(
    aiohttp_client: AiohttpClient, projects: Projects, broker: Broker, clean_environment: None
) -> None:
    """The documented limit: the stream takes every event, so nothing is ever returned, and
    the main exchange's alternate exchange decides. Nothing is lost or doubled."""
    client, _, topology = await start_sourced_app(
        aiohttp_client, projects, broker, archive_max_bytes=10_000_000
    )
    assert await unrouted_case(client, broker, projects, topology) == {
        "prod only": ["prod fine-tuning"],
        "everyone": ["staging batch"],
        "unrouted": ["prod fine-tuning", "staging fine-tuning"],
    }


# --- Two bridge processes, reloads, metrics ---------------------------------------------------


def start_sourced_bridge(
    start_bridge: Callable[..., BridgeProcess], projects: Projects, exchange: str
) -> BridgeProcess:
    return start_bridge(
        exchange,
        BRIDGE_WEBHOOK_SECRET=None,
        BRIDGE_SOURCES=",".join(SOURCES),
        BRIDGE_SECRETS_DIR=str(projects.secrets_dir),
        BRIDGE_SECRETS_POLL_INTERVAL="0.2",
    )


async def post_to(bridge: BridgeProcess, source: str, signer: Signer) -> int:
    body = sample_body("batch.completed")
    return await post_webhook(f"{bridge.url}/{source}", body, signer.headers(body))


async def metrics_of(bridge: BridgeProcess) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{bridge.port}/metrics") as response,
    ):
        return await response.text()


@pytest.fixture
def two_bridges(
    start_bridge: Callable[..., BridgeProcess], projects: Projects, broker: Broker
) -> tuple[BridgeProcess, BridgeProcess]:
    exchange = new_sourced_topology(broker).exchange
    return (
        start_sourced_bridge(start_bridge, projects, exchange),
        start_sourced_bridge(start_bridge, projects, exchange),
    )


@pytest.mark.broker
async def test_a_rotation_of_one_source_while_the_others_keep_taking_traffic(
    two_bridges: tuple[BridgeProcess, BridgeProcess], broker: Broker, projects: Projects
) -> None:
    first, second = two_bridges
    for bridge in two_bridges:
        await bridge.wait_ready()
    everyone = await broker.bind_queue(first.exchange, "#")
    team_b_only = await broker.bind_queue(f"{first.exchange}.source.team-b", "batch.*")
    old_prod = projects.signers["prod"]
    new_prod = Signer()
    statuses: list[int] = []
    stop = asyncio.Event()

    async def keep_posting() -> None:
        while not stop.is_set():
            for bridge in two_bridges:
                for source in ("staging", "team-b"):
                    statuses.append(await post_to(bridge, source, projects.signers[source]))

    traffic = asyncio.create_task(keep_posting())
    try:
        assert await post_to(first, "prod", new_prod) == 401
        projects.write("prod", f"{new_prod.secret},{old_prod.secret}")
        second.process.send_signal(signal.SIGHUP)  # the first finds it by polling
        for bridge in two_bridges:
            deadline = time.monotonic() + 15
            while await post_to(bridge, "prod", new_prod) != 200:
                assert time.monotonic() < deadline, "the new prod secret was not taken up"
                await asyncio.sleep(0.1)
            assert await post_to(bridge, "prod", old_prod) == 200  # still in the list
            # Another project's secret never opens prod's path.
            assert await post_to(bridge, "prod", projects.signers["staging"]) == 401
    finally:
        stop.set()
        await traffic
    assert statuses
    assert set(statuses) == {200}
    messages = await broker.drain(everyone)
    assert {message.headers[SOURCE_HEADER] for message in messages} == set(SOURCES)
    team_b = await broker.drain(team_b_only)
    assert team_b
    assert {message.headers[SOURCE_HEADER] for message in team_b} == {"team-b"}
    # Both processes fed it, and each accepted webhook reached it once.
    assert len(team_b) == statuses.count(200) // 2
    assert len({message.message_id for message in team_b}) == len(team_b)
    for bridge in two_bridges:
        exposition = await metrics_of(bridge)
        assert 'webhook_bridge_secret_reloads_total{result="applied",source="prod"} 1.0' in (
            exposition
        )
        assert 'webhook_bridge_secret_reloads_total{result="applied",source="staging"} 0.0' in (
            exposition
        )
        assert 'webhook_bridge_secret_matches_total{secret_index="0",source="prod"}' in exposition


@pytest.mark.broker
async def test_a_refused_reload_of_one_source_leaves_every_source_as_it_was(
    two_bridges: tuple[BridgeProcess, BridgeProcess], projects: Projects
) -> None:
    first, second = two_bridges
    for bridge in two_bridges:
        await bridge.wait_ready()
    projects.write("staging", "whsec_not-base64!")
    # A list that decodes but holds prod's secret would make the source unprovable.
    projects.write("team-b", f"{new_secret()},{projects.signers['prod'].secret}")
    for bridge in two_bridges:
        bridge.process.send_signal(signal.SIGHUP)
    for bridge in two_bridges:
        deadline = time.monotonic() + 15
        while True:
            exposition = await metrics_of(bridge)
            refused = [
                line
                for line in exposition.splitlines()
                if line.startswith('webhook_bridge_secret_reloads_total{result="refused"')
                and not line.endswith(" 0.0")
            ]
            if len(refused) == 2:
                break
            assert time.monotonic() < deadline, exposition
            await asyncio.sleep(0.1)
        assert {line.split('source="')[1].split('"')[0] for line in refused} == {
            "staging",
            "team-b",
        }
        for source in SOURCES:
            assert await post_to(bridge, source, projects.signers[source]) == 200
    log = second.log_path.read_text()
    assert "refused the webhook secrets in" in log
    assert "source 'prod' holds one of its secrets" in log
    assert projects.signers["prod"].secret.removeprefix("whsec_") not in log
    first.stop()


# --- The commands: endpoints, trigger, consume, replay --------------------------------------


def test_endpoints_rotates_with_the_sources_key_into_its_directory(
    endpoints: Callable[..., EndpointsOutcome],  # noqa: F811  # the fixture
    standin: RunningStandIn,  # noqa: F811  # the fixture
    projects: Projects,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-another-project")  # not the one to use
    monkeypatch.setenv("BRIDGE_SECRETS_DIR", str(projects.secrets_dir))
    (projects.secrets_dir / "staging" / "OPENAI_API_KEY").write_text(standin.state.api_key + "\n")
    endpoint_id = standin.state.add_endpoint()
    current = projects.signers["staging"].secret
    prod_before = projects.secret_file("prod").read_text()

    outcome = endpoints("--source", "staging", "rotate-secret", endpoint_id, "--keep-old")
    assert outcome.code == 0, outcome.err
    new = standin.state.endpoints[endpoint_id].secret
    assert projects.secret_file("staging").read_text().strip().split(",") == [new, current]
    assert projects.secret_file("prod").read_text() == prod_before
    assert standin.state.requests[-1][2]["Authorization"] == f"Bearer {standin.state.api_key}"
    assert new.removeprefix("whsec_")[:16] not in outcome.out + outcome.err

    monkeypatch.setenv("OPENAI_API_KEY_TEAM_B", standin.state.api_key)
    listed = endpoints("--source", "team-b", "list")
    assert listed.code == 0, listed.err
    missing = endpoints("--source", "prod", "list")
    assert missing.code == 2
    assert "source 'prod' has no OpenAI API key: set OPENAI_API_KEY_PROD" in missing.err


def run_command(projects: Projects, exchange: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        env=command_environment(projects, exchange),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def command_environment(projects: Projects, exchange: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("BRIDGE_")}
    environment.update(
        BRIDGE_SOURCES=",".join(SOURCES),
        BRIDGE_SECRETS_DIR=str(projects.secrets_dir),
        BRIDGE_AMQP_URL=AMQP_URL,
        BRIDGE_EXCHANGE=exchange,
    )
    return environment


@pytest.mark.broker
async def test_trigger_and_consume_by_source_with_per_source_verification(
    start_bridge: Callable[..., BridgeProcess], projects: Projects, broker: Broker
) -> None:
    topology = new_sourced_topology(broker)
    exchange = topology.exchange
    bridge = start_sourced_bridge(start_bridge, projects, exchange)
    await bridge.wait_ready()
    consumer = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "bridge", "consume", "batch.*", "--source", "staging"),
        *("--verify", "--json", "--count", "1"),
        env=command_environment(projects, exchange),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert consumer.stderr is not None
        # The consumer logs the node it reached, then what it bound.
        bound = f"bound to {topology.source_exchange('staging')}"
        started = ""
        while bound not in started:
            logged = await asyncio.wait_for(consumer.stderr.readline(), 30)
            assert logged, f"the consumer ended without saying it {bound}"
            started = logged.decode()
        # Forged: labelled staging, signed with prod's secret, put straight on staging's
        # exchange. The consumer verifies with staging's secrets and drops it.
        body = sample_body("batch.failed")
        forged = projects.signers["prod"].headers(body)
        channel = broker.channel
        source_exchange = await channel.get_exchange(topology.source_exchange("staging"))
        await source_exchange.publish(
            aio_pika.Message(
                body,
                headers={**forged, SOURCE_HEADER: "staging"},
                message_id=forged["webhook-id"],
            ),
            routing_key="batch.failed",
        )
        for source in ("prod", "staging"):
            url = f"http://127.0.0.1:{bridge.port}{WEBHOOK_PATH}"
            sent = await asyncio.to_thread(
                run_command,
                *(projects, exchange, "trigger", "batch.completed"),
                *("--source", source, "--url", url),
            )
            assert sent.returncode == 0, sent.stderr
            assert "200" in sent.stdout
        out, err = await asyncio.wait_for(consumer.communicate(), 30)
    finally:
        if consumer.returncode is None:
            consumer.kill()
            await consumer.wait()
    assert consumer.returncode == 0, err
    (line,) = out.decode().splitlines()
    assert json.loads(line)["type"] == "batch.completed"
    assert b"signature" in err  # the forgery was logged, not printed


@pytest.mark.broker
async def test_replay_by_source_and_refusals_of_the_commands(
    sourced: tuple[Client, Settings, Topology], broker: Broker, projects: Projects
) -> None:
    client, settings, topology = sourced
    ids = {}
    for source in ("prod", "staging"):
        body = sample_body("batch.completed")
        headers = projects.signers[source].headers(body)
        ids[source] = headers["webhook-id"]
        response = await client.post(f"{WEBHOOK_PATH}/{source}", data=body, headers=headers)
        assert (await response.json())["outcome"] == "unrouted"
    target = await broker.bind_queue(unique_name("test.unused"))
    replayed = await asyncio.to_thread(
        run_command,
        projects,
        settings.exchange,
        "replay",
        "--from",
        "unrouted",
        "--source",
        "staging",
        "--to-queue",
        target,
        "--json",
    )
    assert replayed.returncode == 0, replayed.stderr
    summary = json.loads(replayed.stdout)
    assert summary["replayed"] == 1
    [message] = await broker.drain(target)
    assert message.message_id == ids["staging"]
    assert message.headers[SOURCE_HEADER] == "staging"
    # prod's event stays where it was.
    [left] = await broker.drain(topology.unrouted_exchange)
    assert left.message_id == ids["prod"]

    unknown = await asyncio.to_thread(
        run_command, projects, settings.exchange, "trigger", "batch.completed", "--source", "qa"
    )
    assert unknown.returncode != 0
    assert "--source qa: no such source" in unknown.stderr
    sourceless = await asyncio.to_thread(
        run_command, projects, settings.exchange, "trigger", "batch.completed"
    )
    assert sourceless.returncode == 2
    assert "give --source NAME" in sourceless.stderr


# --- Operator-managed topology ----------------------------------------------------------------


@pytest.mark.broker
async def test_without_declaring_a_missing_source_exchange_keeps_the_bridge_unready(
    start_bridge: Callable[..., BridgeProcess], projects: Projects, broker: Broker
) -> None:
    topology = new_sourced_topology(broker)
    exchange = topology.exchange
    for name in (topology.exchange, topology.unrouted_exchange, topology.quarantine_exchange):
        await broker.channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
    await broker.channel.declare_exchange(
        topology.sources_exchange, aio_pika.ExchangeType.HEADERS, durable=True
    )
    bridge = start_bridge(
        exchange,
        BRIDGE_WEBHOOK_SECRET=None,
        BRIDGE_SOURCES=",".join(SOURCES),
        BRIDGE_SECRETS_DIR=str(projects.secrets_dir),
        BRIDGE_DECLARE_TOPOLOGY="false",
    )
    missing = f"exchange {topology.source_exchange('prod')!r} does not exist"
    deadline = time.monotonic() + 20
    while missing not in bridge.log_path.read_text():
        assert time.monotonic() < deadline, bridge.log_path.read_text()
        await asyncio.sleep(0.1)
    assert await post_to(bridge, "prod", projects.signers["prod"]) == 503


@pytest.fixture
def imported() -> Iterator[ImportedDefinitions]:
    """deploy/rabbitmq/definitions.json in a throwaway vhost (see tests/test_deploy.py)."""
    with _import_definitions(set_passwords=True) as definitions:
        yield definitions


@pytest.mark.broker
async def test_the_definitions_sources_with_the_least_privilege_user(
    imported: ImportedDefinitions,
    start_bridge: Callable[..., BridgeProcess],
    tmp_path: Path,
) -> None:
    """The two example projects of definitions.json, archive on, the bridge only checking the
    topology as its least-privilege user: each source reaches the main exchange's queue and
    its own exchange, labelled, and an event no queue takes is unrouted."""
    signers = {source: Signer() for source in ("prod", "staging")}
    secrets_dir = tmp_path / "definitions-secrets"
    for source, signer in signers.items():
        (secrets_dir / source).mkdir(parents=True)
        (secrets_dir / source / "BRIDGE_WEBHOOK_SECRET").write_text(signer.secret)
    bridge = start_bridge(
        exchange="openai.webhooks",
        BRIDGE_WEBHOOK_SECRET=None,
        BRIDGE_SOURCES="prod,staging",
        BRIDGE_SECRETS_DIR=str(secrets_dir),
        BRIDGE_AMQP_URL=imported.amqp_url,
        BRIDGE_DECLARE_TOPOLOGY="false",
        BRIDGE_ARCHIVE_MAX_AGE="7D",
    )
    await bridge.wait_ready()
    vhost = imported.vhost
    await asyncio.to_thread(_rabbitmqctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    inspector = await aio_pika.connect(AMQP_URL.rstrip("/") + "/" + quote(vhost, safe=""))
    async with inspector:
        channel = await inspector.channel()
        staging_queue = await channel.declare_queue(exclusive=True)
        await staging_queue.bind("openai.webhooks.source.staging", routing_key="batch.*")
        # No queue of the definitions binds eval.run.*: it waits in the unrouted queue.
        batch, unbound = sample_body("batch.completed"), sample_body("eval.run.succeeded")
        assert await post_to_body(bridge, "staging", signers["staging"], batch) == 200
        assert await post_to_body(bridge, "prod", signers["prod"], unbound) == 200
        billing = await channel.get_queue("billing.batch-outcomes", ensure=False)
        unrouted = await channel.get_queue("openai.webhooks.unrouted", ensure=False)
        for queue, body in ((billing, batch), (staging_queue, batch), (unrouted, unbound)):
            message = await queue.get(no_ack=True, timeout=10)
            assert message.body == body
            expected = "staging" if body is batch else "prod"
            assert message.headers[SOURCE_HEADER] == expected
        assert await billing.get(no_ack=True, fail=False) is None


async def post_to_body(bridge: BridgeProcess, source: str, signer: Signer, body: bytes) -> int:
    return await post_webhook(f"{bridge.url}/{source}", body, signer.headers(body))


@pytest.mark.broker
async def test_the_archive_read_by_source_with_each_sources_secrets(
    aiohttp_client: AiohttpClient, projects: Projects, broker: Broker, clean_environment: None
) -> None:
    client, settings, _ = await start_sourced_app(
        aiohttp_client, projects, broker, archive_max_bytes=10_000_000
    )
    bodies = {}
    for source in ("prod", "staging", "team-b"):
        bodies[source] = sample_body("batch.completed")
        status = await post(
            client, f"{WEBHOOK_PATH}/{source}", projects.signers[source], bodies[source]
        )
        assert status == 200
    follower = ArchiveFollower(
        AMQP_URL,
        exchange=settings.exchange,
        patterns=["batch.*"],
        since=datetime.now(UTC) - timedelta(minutes=1),
        until=datetime.now(UTC) + timedelta(seconds=1),
        verify_secrets={name: [signer.secret] for name, signer in projects.signers.items()},
        source="staging",
    )
    async with asyncio.timeout(30), follower:
        read = [(delivery.source, delivery.body) async for delivery in follower]
    assert read == [("staging", bodies["staging"])]


# --- Deployment -------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_kubernetes_component_mounts_each_source_in_its_directory(tmp_path: Path) -> None:
    documents = {doc["kind"]: doc for doc in kustomize_overlay(tmp_path, DEPLOY / "sources")}
    sources = parse_source_names(documents["ConfigMap"]["data"]["BRIDGE_SOURCES"])
    assert sources == ("prod", "staging")
    (volume,) = [
        volume
        for volume in documents["Deployment"]["spec"]["template"]["spec"]["volumes"]
        if volume["name"] == "secrets"
    ]
    items = {item["key"]: item["path"] for item in volume["secret"]["items"]}
    assert items == {
        "BRIDGE_AMQP_URL": "BRIDGE_AMQP_URL",
        **{f"{name}.BRIDGE_WEBHOOK_SECRET": f"{name}/BRIDGE_WEBHOOK_SECRET" for name in sources},
    }
    assert volume["secret"]["defaultMode"] & 0o007 == 0
    (example,) = _load_all(DEPLOY / "sources" / "secret.example.yaml")
    assert set(items) <= set(example["stringData"])
    # The broker definitions and the compose demo serve the same two projects.
    exchanges = {exchange["name"] for exchange in json.loads(DEFINITIONS.read_text())["exchanges"]}
    assert {source_exchange_name("openai.webhooks", name) for name in sources} <= exchanges
    compose = _compose()["services"]["bridge"]["environment"]
    assert parse_source_names(compose["BRIDGE_SOURCES"]) == sources


def test_stored_messages_are_verified_with_each_sources_own_secrets(
    projects: Projects, clean_environment: None
) -> None:
    settings = source_settings(projects)
    retired = new_secret()
    secrets = settings.verification_secrets([retired], source="staging")
    assert isinstance(secrets, dict)
    assert secrets == {
        "prod": [projects.signers["prod"].secret],
        "staging": [projects.signers["staging"].secret, retired],
        "team-b": [projects.signers["team-b"].secret],
    }
    with pytest.raises(SettingsError, match="extra secrets need --source NAME"):
        settings.verification_secrets([retired])
    with pytest.raises(SettingsError, match="--source qa: no such source"):
        settings.verification_secrets(source="qa")
    # Settings made without the sources' secrets cannot serve: every webhook would be refused.
    with pytest.raises(SettingsError, match="the sources' secrets were not read"):
        create_app(Settings(sources="prod"))


@pytest.mark.broker
async def test_turning_the_archive_on_later_leaves_one_route_to_each_source(
    broker: Broker,
) -> None:
    """Declared without the archive, then with it: the main exchange's binding to the
    headers exchange goes, or every event would reach a source's queues twice and the main
    exchange's alternate exchange would never fire."""
    exchange = unique_name("test.webhooks")
    plain = Topology(exchange, f"{exchange}.unrouted", f"{exchange}.quarantine", sources=SOURCES)
    archived = Topology(
        exchange,
        plain.unrouted_exchange,
        plain.quarantine_exchange,
        archive=ArchiveRetention(max_bytes=10_000_000),
        sources=SOURCES,
    )
    forget_source_topology(broker, archived)
    for topology in (plain, archived):
        async with broker.connection.channel() as channel:
            await declare_topology(channel, topology)
    prod_queue = await broker.bind_queue(archived.source_exchange("prod"), "#")
    async with broker.connection.channel(publisher_confirms=True) as channel:
        ingress = await channel.get_exchange(archived.ingress_exchange)
        for event_type in ("batch.completed", "batch.failed"):
            await ingress.publish(
                aio_pika.Message(sample_body(event_type), headers={SOURCE_HEADER: "prod"}),
                routing_key=event_type,
            )
    assert len(await broker.drain(prod_queue)) == 2
    # Bound on no queue of the main exchange: its alternate exchange took both.
    assert len(await broker.drain(archived.unrouted_exchange)) == 2
