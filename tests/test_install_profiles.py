"""The released wheel in virtualenvs without extras, with ``[redis]`` and with ``[otel]``.

In each: every module imports (or, for a module that exists only for an extra, names
it), the help of every command, the laptop tour (``serve``, ``consume '#' --verify``,
``trigger``), the consumer from the docs' tutorial, and what the missing extras do.
One ``serve`` per profile is shared by the tests that need a bridge; in the ``redis``
profile it deduplicates in Redis, in the ``otel`` profile it exports spans over OTLP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import secrets
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO

import pytest
import redis

from bridge.cli import build_parser
from bridge.dedup.redis_claims import RedisClaims
from bridge.dedup.redis_pipeline import connect
from bridge.dedup.store import ClaimState
from bridge.redis_url import parse_redis_url
from bridge.settings import DEDUP_WINDOW_WITH_REDIS
from tests.conftest import AMQP_URL, BridgeProcess, free_port, fresh_channel, new_secret
from tests.conftest import unique_name as unique
from tests.install_profiles import (
    EXTRA_MODULES,
    IMPORT_EVERY_MODULE,
    PROFILE_EXTRAS,
    REPOSITORY,
    InstalledProfile,
    profile,
    release,
)
from tests.redis_support import REDIS_URL

pytestmark = [pytest.mark.install, pytest.mark.timeout(300)]

PROFILES = [
    pytest.param("plain"),
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("otel"),
]
TOUR_TYPES = ["batch.completed", "response.completed", "eval.run.failed"]
CONSUMER_TUTORIAL = REPOSITORY / "docs" / "tutorials" / "writing-a-consumer.md"
STARTUP_TIMEOUT = 30.0


def extra_is_missing(installed: InstalledProfile, extra: str) -> bool:
    return extra not in PROFILE_EXTRAS[installed.name]


@pytest.fixture(scope="module", params=PROFILES)
def installed(request: pytest.FixtureRequest) -> InstalledProfile:
    name: str = request.param
    return profile(name)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A working directory outside the repository, so only the install can be imported."""
    path = tmp_path / "work"
    path.mkdir()
    return path


def run(
    installed: InstalledProfile, cwd: Path, *command: str | Path, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=installed.environ(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_the_wheel_holds_the_package_and_nothing_else() -> None:
    built = release()
    package = {
        path.relative_to(built.source).as_posix()
        for path in (built.source / "bridge").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    in_wheel = {name for name in built.wheel_files() if ".dist-info/" not in name}
    assert "bridge/py.typed" in in_wheel
    assert not {name for name in in_wheel if name.split("/")[0] in ("tests", "bench", "fuzz")}
    # Built from the sdist: the sdist lost nothing of the package on the way.
    assert in_wheel == package


def test_every_module_imports_or_names_its_extra(
    installed: InstalledProfile, workdir: Path
) -> None:
    done = run(installed, workdir, installed.python, "-c", IMPORT_EVERY_MODULE)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert Path(report["file"]).is_relative_to(installed.venv)
    outcomes: dict[str, str] = report["outcomes"]
    assert {"bridge.cli", "bridge.consumer", "bridge.dedup.idempotency"} <= outcomes.keys()
    expected = {
        module: f"needs {EXTRA_MODULES[module]}"
        if module in EXTRA_MODULES and extra_is_missing(installed, EXTRA_MODULES[module])
        else "imported"
        for module in outcomes
    }
    assert outcomes == expected


def command_paths(parser: argparse.ArgumentParser) -> list[list[str]]:
    """Every command and subcommand of ``parser``, as the arguments naming it."""
    paths: list[list[str]] = [[]]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                paths += [[name, *path] for path in command_paths(subparser)]
    return paths


HELP_OF_EACH = """
import contextlib, io, json, sys
from bridge.cli import main

answers = {}
for path in json.loads(sys.argv[1]):
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        try:
            main([*path, "--help"])
            status = "returned"
        except SystemExit as leaving:
            status = leaving.code
    answers[" ".join(path)] = [status, shown.getvalue()]
print(json.dumps(answers))
"""


def test_the_help_of_every_command(installed: InstalledProfile, workdir: Path) -> None:
    paths = command_paths(build_parser())
    assert {"serve", "trigger", "consume"} <= {path[0] for path in paths if path}
    for command in ([installed.command("webhook-bridge")], [installed.python, "-m", "bridge"]):
        done = run(installed, workdir, *command, "--help")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage: webhook-bridge ")
    # Each command's parser, in one process of the install rather than one per command.
    done = run(installed, workdir, installed.python, "-c", HELP_OF_EACH, json.dumps(paths))
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    for path in paths:
        status, shown = answers[" ".join(path)]
        assert status == 0, path
        assert shown.startswith(" ".join(["usage: webhook-bridge", *path])), path


class OtlpCollector(ThreadingHTTPServer):
    """Accepts OTLP/HTTP exports and keeps their bodies."""

    def __init__(self) -> None:
        self.exports: list[bytes] = []
        self.received = threading.Condition()
        super().__init__(("127.0.0.1", 0), _OtlpHandler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def wait_for(self, text: bytes, timeout: float) -> None:
        with self.received:
            if not self.received.wait_for(
                lambda: any(text in body for body in self.exports), timeout
            ):
                raise AssertionError(f"no span export holding {text!r} within {timeout} s")


class _OtlpHandler(BaseHTTPRequestHandler):
    server: OtlpCollector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/traces":
            with self.server.received:
                self.server.exports.append(body)
                self.server.received.notify_all()
        # An empty ExportTraceServiceResponse: everything accepted.
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Serving:
    """``webhook-bridge serve`` of one install, and what its other commands need."""

    installed: InstalledProfile
    bridge: BridgeProcess
    secret: str
    secrets_dir: Path
    collector: OtlpCollector | None

    @property
    def exchange(self) -> str:
        return self.bridge.exchange

    def environ(self, **extra: str) -> dict[str, str]:
        return self.installed.environ(
            BRIDGE_AMQP_URL=AMQP_URL,
            BRIDGE_EXCHANGE=self.exchange,
            BRIDGE_SECRETS_DIR=str(self.secrets_dir),
            **extra,
        )

    def trigger(self, cwd: Path, *arguments: str) -> list[dict[str, object]]:
        """Send signed samples through ``webhook-bridge trigger``; what it sent."""
        done = subprocess.run(
            [
                self.installed.command("webhook-bridge"),
                "trigger",
                "--url",
                self.bridge.url,
                "--json",
                *arguments,
            ],
            cwd=cwd,
            env=self.environ(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]


def feature_settings(name: str, collector: OtlpCollector | None) -> dict[str, str]:
    """What turns on the profile's extra in ``serve``."""
    if name == "redis":
        return {"BRIDGE_DEDUP_URL": REDIS_URL}
    if collector is not None:
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    return {}


@pytest.fixture(scope="module")
def serving(
    installed: InstalledProfile, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Serving]:
    """One bridge per install, with its extra in use; its topology deleted afterwards."""
    root = tmp_path_factory.mktemp(f"serve-{installed.name}")
    secrets_dir = root / "secrets"
    secrets_dir.mkdir()
    secret = new_secret()
    (secrets_dir / "BRIDGE_WEBHOOK_SECRET").write_text(secret + "\n")
    collector = OtlpCollector() if installed.name == "otel" else None
    if collector is not None:
        threading.Thread(target=collector.serve_forever, daemon=True).start()
    exchange = unique(f"install.{installed.name}")
    port, operations_port = free_port(), free_port()
    log_path = root / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [installed.command("webhook-bridge"), "serve"],
            cwd=root,
            env=installed.environ(
                BRIDGE_AMQP_URL=AMQP_URL,
                BRIDGE_EXCHANGE=exchange,
                BRIDGE_SECRETS_DIR=str(secrets_dir),
                BRIDGE_HOST="127.0.0.1",
                BRIDGE_PORT=str(port),
                BRIDGE_METRICS_PORT=str(operations_port),
                **feature_settings(installed.name, collector),
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    bridge = BridgeProcess(process, port, exchange, log_path)
    try:
        wait_until_ready(bridge, f"http://127.0.0.1:{operations_port}/readyz")
        yield Serving(installed, bridge, secret, secrets_dir, collector)
    finally:
        bridge.stop()
        if collector is not None:
            collector.shutdown()
            collector.server_close()
        # The unrouted and quarantine exchanges, each with its queue of the same name.
        owned = [f"{exchange}.unrouted", f"{exchange}.quarantine"]
        asyncio.run(delete(queues=owned, exchanges=[exchange, *owned]))


def wait_until_ready(bridge: BridgeProcess, readyz: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline and bridge.process.poll() is None:
        # Not ready yet: refused, or 503 (an HTTPError, which is an OSError).
        with contextlib.suppress(OSError), urllib.request.urlopen(readyz, timeout=5) as answer:
            if answer.status == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"serve did not become ready:\n{bridge.log_path.read_text()}")


async def delete(*, queues: list[str], exchanges: list[str]) -> None:
    async with fresh_channel() as channel:
        for queue in queues:
            await channel.queue_delete(queue)
        for exchange in exchanges:
            await channel.exchange_delete(exchange)


def wait_for_line(stream: IO[str], start: str, process: subprocess.Popen[str]) -> None:
    """Read ``stream`` until a line starting with ``start``; fail if the process ends first."""
    seen = []
    for line in stream:
        if line.startswith(start):
            return
        seen.append(line)
    process.wait(timeout=10)
    raise AssertionError(f"exited {process.returncode} before {start!r}:\n{''.join(seen)}")


@pytest.mark.broker
def test_the_laptop_tour(serving: Serving, workdir: Path) -> None:
    consume = subprocess.Popen(
        [
            serving.installed.command("webhook-bridge"),
            "consume",
            "#",
            "--verify",
            "--count",
            str(len(TOUR_TYPES)),
        ],
        cwd=workdir,
        env=serving.environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert consume.stderr is not None
        wait_for_line(consume.stderr, "consuming from", consume)
        sent = serving.trigger(workdir, *TOUR_TYPES)
        printed, errors = consume.communicate(timeout=30)
    finally:
        consume.kill()
    assert consume.returncode == 0, errors
    bodies = [json.loads(line) for line in printed.splitlines()]
    assert sorted((body["type"], body["id"]) for body in bodies) == sorted(
        (event["type"], event["event_id"]) for event in sent
    )
    if serving.installed.name == "redis":
        # Each delivery was claimed and confirmed under the bridge's prefix in Redis.
        states = asyncio.run(
            confirmed_states(
                f"webhook-bridge:{serving.exchange}:", [str(each["webhook_id"]) for each in sent]
            )
        )
        assert set(states) == {ClaimState.CONFIRMED}, states
    if serving.collector is not None:
        serving.collector.wait_for(b"POST /webhooks/openai", timeout=15)


async def confirmed_states(prefix: str, webhook_ids: list[str]) -> list[ClaimState | None]:
    """What the bridge's Redis store says of each id, read as the bridge reads it."""
    claims = RedisClaims(
        connect(parse_redis_url(REDIS_URL), timeout=5.0),
        prefix=prefix,
        window_seconds=DEDUP_WINDOW_WITH_REDIS,
    )
    try:
        return list(await asyncio.gather(*(claims.state(each) for each in webhook_ids)))
    finally:
        await claims.commands.close()


def tutorial_consumer(queue: str) -> str:
    """The consumer program of the writing-a-consumer tutorial, on ``queue`` instead of
    ``billing`` (a durable queue other runs must not share)."""
    page = CONSUMER_TUTORIAL.read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.DOTALL)
    program: str = next(block for block in blocks if "EventConsumer(" in block)
    assert program.count('"billing') == 2, "the tutorial's queue names changed"
    return program.replace('"billing', f'"{queue}')


@pytest.mark.broker
def test_the_tutorial_consumer(serving: Serving, workdir: Path) -> None:
    queue = unique("install.billing")
    (workdir / "billing.py").write_text(tutorial_consumer(queue))
    batch_id = f"batch_{secrets.token_hex(6)}"
    consumer = subprocess.Popen(
        [serving.installed.python, "billing.py"],
        cwd=workdir,
        env=serving.environ(BRIDGE_WEBHOOK_SECRET=serving.secret),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert consumer.stdout is not None
        wait_for_line(consumer.stdout, "waiting for batch events", consumer)
        serving.trigger(
            workdir,
            *["batch.completed", "response.completed", "batch.failed"],
            *["--data", f"data.id={batch_id}"],
        )
        printed, errors = consumer.communicate(timeout=30)
    finally:
        consumer.send_signal(signal.SIGKILL)
        asyncio.run(delete(queues=[queue, f"{queue}.dlx"], exchanges=[f"{queue}.dlx"]))
    assert consumer.returncode == 0, errors
    assert printed.splitlines() == [f"batch {batch_id} completed", f"batch {batch_id} failed"]


def start_serve(
    installed: InstalledProfile, cwd: Path, **settings: str
) -> subprocess.CompletedProcess[str]:
    """``serve`` with a valid secret and ``settings``, expected to stop at start-up."""
    return run(
        installed,
        cwd,
        installed.command("webhook-bridge"),
        "serve",
        timeout=STARTUP_TIMEOUT,
        BRIDGE_WEBHOOK_SECRET=new_secret(),
        BRIDGE_HOST="127.0.0.1",
        BRIDGE_PORT=str(free_port()),
        BRIDGE_METRICS_PORT=str(free_port()),
        BRIDGE_EXCHANGE=unique("install.refused"),
        **settings,
    )


def assert_one_line_naming(done: subprocess.CompletedProcess[str], extra: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("webhook-bridge: configuration error: ")
    assert f"pip install 'openai-webhook-bridge[{extra}]'" in line


def test_spans_without_the_otel_extra_stop_serve(
    installed: InstalledProfile, workdir: Path
) -> None:
    if not extra_is_missing(installed, "otel"):
        pytest.skip("the otel extra is installed here")
    assert_one_line_naming(start_serve(installed, workdir, OTEL_TRACES_EXPORTER="otlp"), "otel")


def test_a_dedup_url_without_the_redis_extra_stops_serve(
    installed: InstalledProfile, workdir: Path
) -> None:
    if not extra_is_missing(installed, "redis"):
        pytest.skip("the redis extra is installed here")
    done = start_serve(installed, workdir, BRIDGE_DEDUP_URL="redis://127.0.0.1:6379/0")
    assert_one_line_naming(done, "redis")


IDEMPOTENCY_STORE = """
import asyncio, sys
from bridge.dedup.idempotency import RedisIdempotencyStore

async def main():
    try:
        store = RedisIdempotencyStore(sys.argv[1], namespace=sys.argv[2])
    except ImportError as error:
        print(f"{type(error).__name__}: {error}")
        return
    try:
        print(await store.claim("msg_1"), end=" ")
        await store.done("msg_1")
        print(await store.claim("msg_1"))
    finally:
        await store.close()

asyncio.run(main())
"""


def test_the_redis_idempotency_store(installed: InstalledProfile, workdir: Path) -> None:
    namespace = unique("install")
    done = run(installed, workdir, installed.python, "-c", IDEMPOTENCY_STORE, REDIS_URL, namespace)
    assert done.returncode == 0, done.stderr
    if extra_is_missing(installed, "redis"):
        assert done.stdout == (
            "MissingExtraError: RedisIdempotencyStore needs the 'redis' extra: "
            "pip install 'openai-webhook-bridge[redis]'\n"
        )
    else:
        assert done.stdout == "ClaimState.NEW ClaimState.CONFIRMED\n"
        client = redis.Redis.from_url(REDIS_URL)
        client.delete(*client.scan_iter(match=f"webhook-consumer:{namespace}:*"))
        client.close()
