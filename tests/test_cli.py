"""``webhook-bridge serve`` as a real process: fail-closed start-up, serving, graceful exit."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from bridge.app import METRICS_FLUSH_SECONDS
from bridge.samples import sample_body
from bridge.server import YOUNG_COLLECTION_THRESHOLD, tune_garbage_collection
from tests.conftest import AMQP_URL, BridgeProcess, Broker, Signer, free_port, new_secret


def serve_with(secret: str | None, *flags: str) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("BRIDGE_")}
    if secret is not None:
        environment["BRIDGE_WEBHOOK_SECRET"] = secret
    return subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "--port", "0", *flags],
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


SHORT_SECRET = "whsec_" + base64.b64encode(b"sixteen-byte-key").decode()


@pytest.mark.parametrize(
    ("secret", "expected"),
    [
        (None, "BRIDGE_WEBHOOK_SECRET is required"),
        ("", "BRIDGE_WEBHOOK_SECRET secret #1 is empty"),
        ("whsec_***not-base64***", "BRIDGE_WEBHOOK_SECRET secret #1 is not valid base64"),
        (SHORT_SECRET, "BRIDGE_WEBHOOK_SECRET secret #1 decodes to 16 bytes"),
    ],
    ids=["missing", "empty", "undecodable", "short"],
)
def test_serve_refuses_to_start_with_an_unusable_secret(secret: str | None, expected: str) -> None:
    result = serve_with(secret)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    if secret:
        assert secret.removeprefix("whsec_") not in result.stderr


def test_a_weak_second_secret_also_stops_start_up(signer: Signer) -> None:
    result = serve_with(f"{signer.secret},{SHORT_SECRET}")
    assert result.returncode == 2
    assert "secret #2" in result.stderr
    assert signer.secret not in result.stderr


def test_flags_override_the_environment(signer: Signer, tmp_path: Path) -> None:
    short_secret_file = tmp_path / "short"
    short_secret_file.write_text(SHORT_SECRET)
    result = serve_with(signer.secret, "--webhook-secret-file", str(short_secret_file))
    assert result.returncode == 2
    assert "decodes to 16 bytes" in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ("serve", "--amqp-url"),
        ("serve", "--dedup-url"),
        ("consume", "#", "--amqp-url"),
        ("replay", "--from", "unrouted", "--amqp-url"),
    ],
    ids=lambda command: " ".join(command),
)
def test_a_password_on_the_command_line_is_refused(command: tuple[str, ...]) -> None:
    scheme = "redis" if command[-1] == "--dedup-url" else "amqp"
    result = subprocess.run(
        [sys.executable, "-m", "bridge", *command, f"{scheme}://user:hunter2@127.0.0.1:1/"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "must not hold a password" in line
    assert "environment" in line
    assert "hunter2" not in result.stderr


@pytest.mark.parametrize(
    "command",
    [("serve",), ("trigger", "--all"), ("consume", "#"), ("replay", "--from", "unrouted")],
    ids=lambda command: command[0],
)
def test_no_flag_takes_a_secret_value(command: tuple[str, ...]) -> None:
    secret = new_secret()
    result = subprocess.run(
        [sys.executable, "-m", "bridge", *command, "--webhook-secret", secret],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "unrecognized arguments: --webhook-secret" in result.stderr
    assert secret.removeprefix("whsec_") not in result.stderr


def test_a_secret_read_from_standard_input(signer: Signer) -> None:
    def trigger_with(stdin: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *(sys.executable, "-m", "bridge", "trigger", "batch.completed"),
                *("--url", f"http://127.0.0.1:{free_port()}/webhooks/openai"),
                *("--webhook-secret-file", "-"),
            ],
            input=stdin,
            env={key: value for key, value in os.environ.items() if not key.startswith("BRIDGE_")},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    refused = trigger_with(SHORT_SECRET + "\n")
    assert refused.returncode == 2
    assert "--webhook-secret-file -: secret #1 decodes to 16 bytes" in refused.stderr
    signed = trigger_with(signer.secret + "\n")
    assert signed.returncode == 1  # signed and sent; nobody listens there
    assert "batch.completed" in signed.stdout


def test_python_dash_m_and_console_script_share_the_parser() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for flag in ("--webhook-secret-file", "--amqp-url", "--exchange", "--drain-timeout", "--port"):
        assert flag in result.stdout


@pytest.mark.broker
async def test_serve_publishes_then_exits_zero_on_sigterm(
    start_bridge: Callable[..., BridgeProcess], broker: Broker, signer: Signer
) -> None:
    bridge = start_bridge(BRIDGE_AMQP_URL=AMQP_URL)
    await bridge.wait_ready()
    queue = await broker.bind_queue(bridge.exchange, "#")
    body = sample_body("eval.run.succeeded")
    assert await bridge.post_signed(signer, body) == 200
    assert (await broker.get(queue)).body == body
    assert bridge.stop() == 0


async def listening_workers(bridge: BridgeProcess, count: int) -> set[int]:
    """The pids of the bridge's workers, once ``count`` of them have logged that they listen."""
    async with asyncio.timeout(30):
        while True:
            entries = [json.loads(line) for line in bridge.log_path.read_text().splitlines()]
            pids = {entry["pid"] for entry in entries if entry["message"].startswith("listening")}
            if len(pids) >= count:
                return pids
            await asyncio.sleep(0.1)


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.broker
async def test_workers_share_the_port_and_metrics_add_up(
    start_bridge: Callable[..., BridgeProcess], broker: Broker, signer: Signer
) -> None:
    bridge = start_bridge(BRIDGE_WORKERS="2")
    await listening_workers(bridge, 2)
    await bridge.wait_ready()
    queue = await broker.bind_queue(bridge.exchange, "#")
    bodies = [sample_body("batch.completed") for _ in range(40)]

    async def post(session: aiohttp.ClientSession, body: bytes) -> int:
        async with session.post(bridge.url, data=body, headers=signer.headers(body)) as response:
            return response.status

    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        statuses = await asyncio.gather(*(post(session, body) for body in bodies))
        assert statuses == [200] * 40
        await asyncio.sleep(METRICS_FLUSH_SECONDS + 0.5)  # every worker has handed over its counts
        scrapes = []
        for _ in range(4):
            async with session.get(f"http://127.0.0.1:{bridge.port}/metrics") as response:
                scrapes.append(await response.text())
    assert sorted(message.body for message in await broker.drain(queue)) == sorted(bodies)
    for text in scrapes:
        assert 'webhook_bridge_requests_total{outcome="published"} 40.0' in text
    assert bridge.stop() == 0


@pytest.mark.broker
@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signals are Linux's")
async def test_workers_stop_when_their_supervisor_is_killed(
    start_bridge: Callable[..., BridgeProcess],
) -> None:
    bridge = start_bridge(BRIDGE_WORKERS="2")
    workers = await listening_workers(bridge, 2)
    await bridge.wait_ready()

    bridge.process.kill()
    bridge.process.wait()

    try:
        async with asyncio.timeout(30):
            while any(running(pid) for pid in workers):
                await asyncio.sleep(0.1)
    finally:
        for pid in filter(running, workers):
            os.kill(pid, signal.SIGKILL)
    log = bridge.log_path.read_text()
    assert log.count('"message": "stopped"') == 2, "each worker drained and exited cleanly"


def test_once_started_the_collector_waits_for_real_cycles() -> None:
    before = gc.get_threshold()
    try:
        tune_garbage_collection()
        assert gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.parametrize("command", [("consume", "#"), ("asyncapi",)], ids=lambda c: c[0])
def test_a_bad_broker_setting_is_one_line_for_every_command(command: tuple[str, ...]) -> None:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("BRIDGE_")}
    result = subprocess.run(
        [sys.executable, "-m", "bridge", *command],
        env={**environment, "BRIDGE_LOG_LEVEL": "loud"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("webhook-bridge: configuration error: BRIDGE_LOG_LEVEL")
