"""``webhook-bridge trigger`` and ``consume`` as real processes, around a real bridge."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bridge.events import KNOWN_EVENT_TYPES
from tests.conftest import AMQP_URL, BridgeProcess, Broker, Signer, new_secret, unique_name

ALL_TYPES = sorted(KNOWN_EVENT_TYPES)
READY_LINE = "consuming from"


def cli_environment(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The caller's environment without its BRIDGE_* settings, plus ``settings``."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("BRIDGE_")}
    # An empty secrets directory, so files on this machine cannot leak into the test.
    environment["BRIDGE_SECRETS_DIR"] = str(tmp_path)
    environment.update(settings)
    return environment


async def run_cli(environment: dict[str, str], *arguments: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        *arguments,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


class Consumer:
    """``webhook-bridge consume`` running in the background."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stderr_lines: list[str] = []

    @classmethod
    async def start(cls, environment: dict[str, str], *arguments: str) -> Consumer:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "consume",
            *arguments,
            env=environment,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        consumer = cls(process)
        await consumer.wait_until_bound()
        return consumer

    async def wait_until_bound(self) -> None:
        """Wait for the line consume writes once its queue is bound."""
        assert self.process.stderr is not None
        async with asyncio.timeout(20):
            while line := (await self.process.stderr.readline()).decode():
                self.stderr_lines.append(line)
                if line.startswith(READY_LINE):
                    return
        raise AssertionError(f"consume exited before binding: {''.join(self.stderr_lines)}")

    async def finish(self, timeout: float = 20) -> tuple[int, list[str], str]:
        async with asyncio.timeout(timeout):
            stdout, stderr = await self.process.communicate()
        assert self.process.returncode is not None
        return (
            self.process.returncode,
            stdout.decode().splitlines(),
            "".join(self.stderr_lines) + stderr.decode(),
        )

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


@pytest.fixture
async def consumers() -> AsyncIterator[list[Consumer]]:
    started: list[Consumer] = []
    yield started
    for consumer in started:
        consumer.kill()
        await consumer.process.wait()


@pytest.mark.broker
async def test_every_triggered_event_reaches_consume_through_the_bridge(
    start_bridge: Callable[..., BridgeProcess],
    broker: Broker,
    signer: Signer,
    tmp_path: Path,
    consumers: list[Consumer],
) -> None:
    bridge = start_bridge()
    await bridge.wait_ready()
    # No webhook secret: consuming does not need one.
    broker_only = cli_environment(
        tmp_path, BRIDGE_AMQP_URL=AMQP_URL, BRIDGE_EXCHANGE=bridge.exchange
    )
    everything = await Consumer.start(broker_only, "#", "--json", "--count", str(len(ALL_TYPES)))
    batches_and_calls = await Consumer.start(
        broker_only, "batch.*", "realtime.#", "--json", "--count", "5"
    )
    consumers += [everything, batches_and_calls]
    published = await broker.bind_queue(bridge.exchange, "#")

    status, stdout, stderr = await run_cli(
        cli_environment(tmp_path, BRIDGE_WEBHOOK_SECRET=signer.secret),
        "trigger",
        "--all",
        "--json",
        "--url",
        bridge.url,
    )
    assert status == 0, stderr
    sent = [json.loads(line) for line in stdout.splitlines()]
    assert [result["type"] for result in sent] == ALL_TYPES
    assert {result["status"] for result in sent} == {200}
    assert {result["outcome"] for result in sent} == {"published"}

    status, lines, stderr = await everything.finish()
    assert status == 0, stderr
    received = [json.loads(line) for line in lines]
    assert [(event["type"], event["id"]) for event in received] == [
        (result["type"], result["event_id"]) for result in sent
    ]
    # The exact bytes the bridge published, not a re-serialisation.
    assert lines == [message.body.decode() for message in await broker.drain(published)]

    status, lines, stderr = await batches_and_calls.finish()
    assert status == 0, stderr
    assert [json.loads(line)["type"] for line in lines] == [
        event_type for event_type in ALL_TYPES if event_type.startswith(("batch.", "realtime."))
    ]


@pytest.mark.broker
async def test_trigger_with_an_unknown_type_lists_the_known_ones_and_sends_nothing(
    start_bridge: Callable[..., BridgeProcess], broker: Broker, signer: Signer, tmp_path: Path
) -> None:
    bridge = start_bridge()
    await bridge.wait_ready()
    queue = await broker.bind_queue(bridge.exchange, "#")
    status, stdout, stderr = await run_cli(
        cli_environment(tmp_path, BRIDGE_WEBHOOK_SECRET=signer.secret),
        "trigger",
        "batch.completed",
        "batch.finished",
        "--url",
        bridge.url,
    )
    assert status == 2
    assert stdout == ""
    assert "unknown event type 'batch.finished'" in stderr
    assert all(event_type in stderr for event_type in ALL_TYPES)
    await asyncio.sleep(0.5)
    assert await broker.drain(queue) == []


@pytest.mark.broker
async def test_trigger_data_overrides_land_in_the_published_body(
    start_bridge: Callable[..., BridgeProcess], broker: Broker, signer: Signer, tmp_path: Path
) -> None:
    bridge = start_bridge()
    await bridge.wait_ready()
    queue = await broker.bind_queue(bridge.exchange, "#")
    secret_file = tmp_path / "elsewhere" / "signing-secret"
    secret_file.parent.mkdir()
    secret_file.write_text(signer.secret)
    status, stdout, stderr = await run_cli(
        cli_environment(tmp_path),
        "trigger",
        "batch.completed",
        "--data",
        "data.id=batch_from_the_test",
        "--data",
        "created_at=1750000000",
        "--webhook-secret-file",
        str(secret_file),
        "--url",
        bridge.url,
    )
    assert status == 0, stderr
    code, event_type, webhook_id, outcome = stdout.split()
    assert (code, event_type, outcome) == ("200", "batch.completed", "published")
    message = await broker.get(queue)
    assert message.message_id == webhook_id
    event = json.loads(message.body)
    assert event["data"] == {"id": "batch_from_the_test"}
    assert event["created_at"] == 1750000000


@pytest.mark.broker
async def test_trigger_fails_when_the_bridge_refuses_or_is_unreachable(
    start_bridge: Callable[..., BridgeProcess], tmp_path: Path
) -> None:
    bridge = start_bridge()
    await bridge.wait_ready()
    another_secret = cli_environment(tmp_path, BRIDGE_WEBHOOK_SECRET=new_secret())
    status, stdout, _ = await run_cli(
        another_secret, "trigger", "response.completed", "--url", bridge.url
    )
    assert status == 1
    assert stdout.startswith("401 response.completed")

    bridge.stop()
    status, stdout, _ = await run_cli(
        another_secret, "trigger", "response.completed", "--url", bridge.url
    )
    assert status == 1
    assert stdout.startswith("--- response.completed")
    assert "error:" in stdout


@pytest.mark.parametrize(
    ("secret", "expected"),
    [(None, "BRIDGE_WEBHOOK_SECRET is required"), ("whsec_", "BRIDGE_WEBHOOK_SECRET secret #1")],
    ids=["missing", "empty"],
)
async def test_trigger_refuses_to_sign_without_a_usable_secret(
    tmp_path: Path, secret: str | None, expected: str
) -> None:
    environment = cli_environment(tmp_path)
    if secret is not None:
        environment["BRIDGE_WEBHOOK_SECRET"] = secret
    status, stdout, stderr = await run_cli(environment, "trigger", "batch.completed")
    assert status == 2
    assert stdout == ""
    (line,) = stderr.strip().splitlines()
    assert line.startswith(f"webhook-bridge: configuration error: {expected}")


async def test_consume_verify_needs_the_webhook_secret(tmp_path: Path) -> None:
    status, _, stderr = await run_cli(cli_environment(tmp_path), "consume", "#", "--verify")
    assert status == 2
    assert "webhook-bridge: configuration error: BRIDGE_WEBHOOK_SECRET is required" in stderr


@pytest.mark.broker
async def test_consume_from_a_missing_exchange_says_to_start_the_bridge(tmp_path: Path) -> None:
    missing = unique_name("test.missing")
    status, stdout, stderr = await run_cli(
        cli_environment(tmp_path, BRIDGE_AMQP_URL=AMQP_URL, BRIDGE_EXCHANGE=missing),
        "consume",
        "#",
    )
    assert status == 1
    assert stdout == ""
    assert f"exchange '{missing}' does not exist" in stderr
    assert "webhook-bridge serve" in stderr
    assert "Traceback" not in stderr


@pytest.mark.broker
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_consume_exits_zero_on_a_signal(
    broker: Broker, tmp_path: Path, consumers: list[Consumer], signum: int
) -> None:
    exchange = unique_name("test.webhooks")
    await broker.channel.declare_exchange(exchange, "topic", durable=True)
    broker.created_exchanges.append(exchange)
    consumer = await Consumer.start(
        cli_environment(tmp_path, BRIDGE_AMQP_URL=AMQP_URL, BRIDGE_EXCHANGE=exchange), "#"
    )
    consumers.append(consumer)
    consumer.process.send_signal(signum)
    status, lines, stderr = await consumer.finish()
    assert status == 0
    assert lines == []
    assert "Traceback" not in stderr


@pytest.mark.broker
async def test_consume_with_a_named_queue_keeps_events_between_runs(
    start_bridge: Callable[..., BridgeProcess],
    broker: Broker,
    signer: Signer,
    tmp_path: Path,
    consumers: list[Consumer],
) -> None:
    bridge = start_bridge()
    await bridge.wait_ready()
    queue = unique_name("test.queue")
    broker.created_queues.append(queue)
    environment = cli_environment(
        tmp_path, BRIDGE_AMQP_URL=AMQP_URL, BRIDGE_EXCHANGE=bridge.exchange
    )
    first_run = await Consumer.start(environment, "eval.run.*", "--queue", queue)
    consumers.append(first_run)
    assert queue in first_run.stderr_lines[-1]
    first_run.process.send_signal(signal.SIGTERM)
    assert (await first_run.finish())[0] == 0

    status, stdout, stderr = await run_cli(
        cli_environment(tmp_path, BRIDGE_WEBHOOK_SECRET=signer.secret),
        "trigger",
        "eval.run.failed",
        "--json",
        "--url",
        bridge.url,
    )
    assert status == 0, stderr
    sent = json.loads(stdout)

    status, stdout, stderr = await run_cli(
        environment, "consume", "eval.run.*", "--queue", queue, "--count", "1", "--json"
    )
    assert status == 0, stderr
    assert json.loads(stdout)["id"] == sent["event_id"]


def read_terminal(controller: int) -> str:
    """Everything written to a pseudo-terminal, until every process has closed its end."""
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: no writer is left
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def subject_of(body: bytes) -> str:
    data = json.loads(body)["data"]
    return str(data.get("call_id") or data.get("session_id") or data["id"])


@pytest.mark.broker
async def test_consume_on_a_terminal_summarises_what_each_event_is_about(
    start_bridge: Callable[..., BridgeProcess],
    broker: Broker,
    signer: Signer,
    tmp_path: Path,
    consumers: list[Consumer],
) -> None:
    bridge = start_bridge()
    await bridge.wait_ready()
    published = await broker.bind_queue(bridge.exchange, "#")
    controller, terminal = pty.openpty()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "consume",
        "#",
        "--count",
        str(len(ALL_TYPES)),
        env=cli_environment(tmp_path, BRIDGE_AMQP_URL=AMQP_URL, BRIDGE_EXCHANGE=bridge.exchange),
        stdout=terminal,
        stderr=asyncio.subprocess.PIPE,
    )
    os.close(terminal)
    consumer = Consumer(process)
    consumers.append(consumer)
    printed = asyncio.create_task(asyncio.to_thread(read_terminal, controller))
    try:
        await consumer.wait_until_bound()
        status, _, stderr = await run_cli(
            cli_environment(tmp_path, BRIDGE_WEBHOOK_SECRET=signer.secret),
            "trigger",
            "--all",
            "--url",
            bridge.url,
        )
        assert status == 0, stderr
        async with asyncio.timeout(20):
            assert await process.wait() == 0
            lines = (await printed).splitlines()
    finally:
        os.close(controller)

    summaries = [line.split()[1:] for line in lines]
    expected = [
        [
            message.routing_key,
            json.loads(message.body)["id"],
            subject_of(message.body),
            message.message_id,
        ]
        for message in await broker.drain(published)
    ]
    assert sorted(summaries) == sorted(expected)
    assert len(summaries) == len(ALL_TYPES)
    # The routing key column is wide enough for the longest type: event ids line up.
    assert len({line.index(" evt_") for line in lines}) == 1


@pytest.mark.broker
async def test_trigger_stops_quietly_when_its_reader_goes_away(
    start_bridge: Callable[..., BridgeProcess], signer: Signer, tmp_path: Path
) -> None:
    bridge = start_bridge()
    await bridge.wait_ready()
    # `head` closes the pipe after the first line; trigger's next line finds no reader.
    shell = await asyncio.create_subprocess_exec(
        "bash",
        "-o",
        "pipefail",
        "-c",
        f"{sys.executable} -m bridge trigger --all --url {bridge.url} | head -n 1",
        env=cli_environment(tmp_path, BRIDGE_WEBHOOK_SECRET=signer.secret),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        stdout, stderr = await shell.communicate()
    assert "Traceback" not in stderr.decode()
    assert shell.returncode == 0, stderr.decode()
    assert stdout.decode().startswith("200 ")
