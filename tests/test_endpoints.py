"""``webhook-bridge endpoints`` against a local stand-in of OpenAI's webhook-endpoint API,
and the stand-in against the real ``openai`` SDK so that it cannot drift from OpenAI's."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import sys
import threading
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from bridge import cli
from bridge.endpoints import SUBSCRIBABLE_EVENT_TYPES
from bridge.secrets import SECRET_FILE_NAME, read_secret_file
from bridge.signature import decode_secret
from tests.conftest import Broker, free_port, new_secret
from tests.openai_standin import OpenAIStandIn


@dataclass
class RunningStandIn:
    state: OpenAIStandIn
    base_url: str


@pytest.fixture
def standin() -> Iterator[RunningStandIn]:
    """The stand-in served from its own thread, so that the command runs as in a shell."""
    state = OpenAIStandIn()
    port = free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(state.app())
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    yield RunningStandIn(state, f"http://127.0.0.1:{port}/v1")
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@dataclass
class Outcome:
    code: int
    out: str
    err: str


@pytest.fixture
def endpoints(
    standin: RunningStandIn, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> typing.Callable[..., Outcome]:
    """Run ``webhook-bridge endpoints ARGS`` configured for the stand-in."""
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "BRIDGE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OPENAI_API_KEY", standin.state.api_key)
    monkeypatch.setenv("OPENAI_BASE_URL", standin.base_url)

    def run(*args: str) -> Outcome:
        capsys.readouterr()
        code = cli.main(["endpoints", *args])
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    return run


def secrets_in(path: Path) -> list[str]:
    return path.read_text().strip().split(",")


def assert_no_secret_printed(outcome: Outcome, standin: OpenAIStandIn) -> None:
    for endpoint in standin.endpoints.values():
        for secret in [endpoint.secret, *(old for old, _ in endpoint.previous_secrets)]:
            encoded = secret.removeprefix("whsec_")
            assert encoded[:16] not in outcome.out + outcome.err
    assert standin.api_key not in outcome.out + outcome.err


def test_create_writes_the_secret_atomically_into_the_secrets_dir(
    endpoints: typing.Callable[..., Outcome],
    standin: RunningStandIn,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BRIDGE_SECRETS_DIR", str(tmp_path))
    outcome = endpoints(
        "create", "--url", "https://bridge.example.com/webhooks/openai", "--name", "prod"
    )
    assert outcome.code == 0, outcome.err
    (endpoint,) = standin.state.endpoints.values()
    assert endpoint.event_types == list(SUBSCRIBABLE_EVENT_TYPES)
    assert (endpoint.name, endpoint.url) == ("prod", "https://bridge.example.com/webhooks/openai")
    secret_file = tmp_path / SECRET_FILE_NAME
    assert secrets_in(secret_file) == [endpoint.secret]
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert read_secret_file(secret_file) == (decode_secret(endpoint.secret),)
    assert [entry.name for entry in tmp_path.iterdir()] == [SECRET_FILE_NAME]  # no leftovers
    assert endpoint.id in outcome.out
    assert str(secret_file) in outcome.out
    assert_no_secret_printed(outcome, standin.state)
    body = [request for request in standin.state.requests if request[0] == "POST"]
    assert body
    assert body[0][2]["Authorization"] == f"Bearer {standin.state.api_key}"


def test_create_with_chosen_events_and_a_secret_file(
    endpoints: typing.Callable[..., Outcome], standin: RunningStandIn, tmp_path: Path
) -> None:
    secret_file = tmp_path / "openai-secret"
    outcome = endpoints(
        "create",
        "--url",
        "https://bridge.example.com/webhooks/openai",
        "--name",
        "batches",
        "--events",
        "batch.completed",
        "batch.failed",
        "--secret-file",
        str(secret_file),
    )
    assert outcome.code == 0, outcome.err
    (endpoint,) = standin.state.endpoints.values()
    assert endpoint.event_types == ["batch.completed", "batch.failed"]
    assert secrets_in(secret_file) == [endpoint.secret]
    assert_no_secret_printed(outcome, standin.state)


def test_create_and_rotate_refuse_without_a_destination(
    endpoints: typing.Callable[..., Outcome], standin: RunningStandIn
) -> None:
    endpoint_id = standin.state.add_endpoint()
    secret_before = standin.state.endpoints[endpoint_id].secret
    for args in (
        ("create", "--url", "https://bridge.example.com/", "--name", "x"),
        ("rotate-secret", endpoint_id),
    ):
        outcome = endpoints(*args)
        assert outcome.code == 2
        assert "BRIDGE_SECRETS_DIR" in outcome.err
        assert "--secret-file" in outcome.err
        assert len(outcome.err.strip().splitlines()) == 1
    # Refused before calling OpenAI: nothing created, nothing rotated.
    assert list(standin.state.endpoints) == [endpoint_id]
    assert standin.state.endpoints[endpoint_id].secret == secret_before
    assert [method for method, _, _ in standin.state.requests] == []


def test_rotate_secret_keep_old_puts_the_new_one_first(
    endpoints: typing.Callable[..., Outcome],
    standin: RunningStandIn,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint_id = standin.state.add_endpoint()
    current = standin.state.endpoints[endpoint_id].secret
    older = new_secret()
    secret_file = tmp_path / SECRET_FILE_NAME
    secret_file.write_text(f"{current},{older}\n")
    secret_file.chmod(0o640)  # the bridge reads it through its group
    inode_before = secret_file.stat().st_ino
    renames: list[tuple[str, str, str]] = []
    real_replace = os.replace

    def recorded_replace(source: str, target: str) -> None:
        renames.append((str(source), str(target), Path(source).read_text()))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", recorded_replace)
    outcome = endpoints(
        "rotate-secret", endpoint_id, "--keep-old", "--secret-file", str(secret_file)
    )
    assert outcome.code == 0, outcome.err
    new = standin.state.endpoints[endpoint_id].secret
    assert new != current
    assert secrets_in(secret_file) == [new, current, older]
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o640
    # Written whole to a temporary file beside it, then renamed over it.
    ((source, target, content),) = renames
    assert Path(source).parent == tmp_path
    assert target == str(secret_file)
    assert content == f"{new},{current},{older}\n"
    assert secret_file.stat().st_ino != inode_before
    assert sorted(entry.name for entry in tmp_path.iterdir()) == [SECRET_FILE_NAME]
    assert "stays valid until" in outcome.out
    assert "UTC" in outcome.out
    assert "3 in" in outcome.out
    assert_no_secret_printed(outcome, standin.state)

    outcome = endpoints("rotate-secret", endpoint_id, "--secret-file", str(secret_file))
    assert outcome.code == 0, outcome.err
    assert secrets_in(secret_file) == [standin.state.endpoints[endpoint_id].secret]
    assert standin.state.endpoints[endpoint_id].previous_secrets == []
    assert "no longer accepts the previous secret" in outcome.out
    assert_no_secret_printed(outcome, standin.state)


def test_rotate_keep_old_refuses_an_unusable_current_file_before_rotating(
    endpoints: typing.Callable[..., Outcome], standin: RunningStandIn, tmp_path: Path
) -> None:
    endpoint_id = standin.state.add_endpoint()
    before = standin.state.endpoints[endpoint_id].secret
    secret_file = tmp_path / SECRET_FILE_NAME
    secret_file.write_text("whsec_c2hvcnQ=\n")
    outcome = endpoints(
        "rotate-secret", endpoint_id, "--keep-old", "--secret-file", str(secret_file)
    )
    assert outcome.code == 2
    assert "cannot be kept" in outcome.err
    assert "secret #1" in outcome.err
    assert standin.state.endpoints[endpoint_id].secret == before
    assert secret_file.read_text() == "whsec_c2hvcnQ=\n"


def test_list_update_delete(
    endpoints: typing.Callable[..., Outcome], standin: RunningStandIn
) -> None:
    ids = [standin.state.add_endpoint(name=f"endpoint-{index}") for index in range(3)]
    listed = endpoints("list")
    assert listed.code == 0, listed.err
    assert sorted(line.split()[0] for line in listed.out.splitlines()) == sorted(ids)
    assert "all 27 event types" in listed.out
    as_json = endpoints("list", "--json")
    assert len(as_json.out.splitlines()) == 3
    assert '"object":"webhook_endpoint"' in as_json.out

    updated = endpoints("update", ids[0], "--name", "renamed", "--events", "response.completed")
    assert updated.code == 0, updated.err
    assert standin.state.endpoints[ids[0]].name == "renamed"
    assert standin.state.endpoints[ids[0]].event_types == ["response.completed"]
    assert "renamed" in updated.out
    assert "response.completed" in updated.out

    nothing = endpoints("update", ids[0])
    assert nothing.code == 2
    assert "nothing to change" in nothing.err

    deleted = endpoints("delete", ids[1], "--yes")
    assert deleted.code == 0
    assert f"deleted {ids[1]}" in deleted.out
    assert ids[1] not in standin.state.endpoints
    for outcome in (listed, as_json, updated, deleted):
        assert_no_secret_printed(outcome, standin.state)


class Terminal:
    """Standard input as a terminal where the user types ``answer``."""

    def __init__(self, answer: str) -> None:
        self.answer = answer

    def isatty(self) -> bool:
        return True

    def readline(self) -> str:
        return self.answer + "\n"


def test_delete_asks_on_a_terminal_and_needs_yes_elsewhere(
    endpoints: typing.Callable[..., Outcome],
    standin: RunningStandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint_id = standin.state.add_endpoint(name="keep-me")
    unattended = endpoints("delete", endpoint_id)
    assert unattended.code == 2
    assert "--yes" in unattended.err
    monkeypatch.setattr(sys, "stdin", Terminal("n"))
    declined = endpoints("delete", endpoint_id)
    assert declined.code == 1
    assert f"delete webhook endpoint {endpoint_id}?" in declined.out
    assert endpoint_id in standin.state.endpoints
    assert not [request for request in standin.state.requests if request[0] == "DELETE"]

    monkeypatch.setattr(sys, "stdin", Terminal("y"))
    accepted = endpoints("delete", endpoint_id)
    assert accepted.code == 0, accepted.err
    assert endpoint_id not in standin.state.endpoints


def test_every_action_prints_json_with_json(
    endpoints: typing.Callable[..., Outcome],
    standin: RunningStandIn,
    tmp_path: Path,
) -> None:
    secret_file = tmp_path / SECRET_FILE_NAME
    nobody_listens = f"http://127.0.0.1:{free_port()}/webhooks/openai"
    created = endpoints(
        *("create", "--url", nobody_listens, "--name", "a"),
        *("--secret-file", str(secret_file), "--json"),
    )
    assert created.code == 0, created.err
    record = json.loads(created.out)
    endpoint_id = record["id"]
    assert record["secret_file"] == str(secret_file)
    assert record["secrets_in_file"] == 1
    assert "signing_secret" not in record

    updated = endpoints("update", endpoint_id, "--name", "b", "--json")
    assert json.loads(updated.out)["name"] == "b"
    tested = endpoints("test", endpoint_id, "--type", "batch.completed", "--json")
    assert tested.code == 1  # nobody answered the delivery
    assert json.loads(tested.out)["webhook_endpoint_id"] == endpoint_id
    rotated = json.loads(
        endpoints(
            "rotate-secret", endpoint_id, "--keep-old", "--secret-file", str(secret_file), "--json"
        ).out
    )
    assert rotated["secrets_in_file"] == 2
    assert rotated["previous_secret_valid_until"] is not None
    deleted = json.loads(endpoints("delete", endpoint_id, "--yes", "--json").out)
    assert deleted == {"id": endpoint_id, "deleted": True, "object": "webhook_endpoint.deleted"}
    for outcome in (created, updated):
        assert_no_secret_printed(outcome, standin.state)


def test_list_follows_pages(
    endpoints: typing.Callable[..., Outcome], standin: RunningStandIn
) -> None:
    ids = {standin.state.add_endpoint(name=f"e{index}") for index in range(250)}
    listed = endpoints("list")
    assert listed.code == 0, listed.err
    assert {line.split()[0] for line in listed.out.splitlines()} == ids
    pages = [path for method, path, _ in standin.state.requests if method == "GET"]
    assert len(pages) == 3
    assert "after=" in pages[1]


def test_organization_and_project_headers(
    endpoints: typing.Callable[..., Outcome],
    standin: RunningStandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_ORG_ID", "org-test")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj_test")
    assert endpoints("list").code == 0
    headers = standin.state.requests[-1][2]
    assert headers["OpenAI-Organization"] == "org-test"
    assert headers["OpenAI-Project"] == "proj_test"


@pytest.mark.parametrize(
    ("arrange", "args", "expected"),
    [
        ("bad_key", ("list",), "OpenAI refused the API key (401): Incorrect API key provided."),
        ("none", ("delete", "we_missing", "--yes"), "not found (404): No webhook endpoint found"),
        ("rate_limited", ("list",), "rate limited by OpenAI (429): Rate limit reached"),
        ("none", ("test", "we_missing", "--type", "batch.completed"), "not found (404)"),
        ("none", ("update", "we_missing", "--name", "x"), "not found (404)"),
        ("no_key", ("list",), "OPENAI_API_KEY is not set"),
        ("unreachable", ("list",), "cannot reach OpenAI at http://127.0.0.1:"),
    ],
    ids=["401", "404-delete", "429", "404-test", "404-update", "no-key", "unreachable"],
)
def test_api_errors_are_one_line_and_exit_non_zero(
    endpoints: typing.Callable[..., Outcome],
    standin: RunningStandIn,
    monkeypatch: pytest.MonkeyPatch,
    arrange: str,
    args: tuple[str, ...],
    expected: str,
) -> None:
    if arrange == "bad_key":
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-" + "x" * 20)
    elif arrange == "rate_limited":
        standin.state.rate_limited_calls = 1
    elif arrange == "no_key":
        monkeypatch.delenv("OPENAI_API_KEY")
    elif arrange == "unreachable":
        monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{free_port()}/v1")
    outcome = endpoints(*args)
    assert outcome.code != 0
    assert outcome.out == ""
    lines = outcome.err.strip().splitlines()
    assert len(lines) == 1, outcome.err
    assert expected in lines[0]
    if arrange == "rate_limited":
        assert lines[0].endswith("retry after 7 s")
    assert "sk-" not in outcome.err


def test_rotate_refused_by_openai_leaves_the_file_alone(
    endpoints: typing.Callable[..., Outcome], standin: RunningStandIn, tmp_path: Path
) -> None:
    secret_file = tmp_path / SECRET_FILE_NAME
    secret_file.write_text(new_secret() + "\n")
    before = secret_file.read_text()
    outcome = endpoints(
        "rotate-secret", "we_missing", "--keep-old", "--secret-file", str(secret_file)
    )
    assert outcome.code == 1
    assert "not found (404)" in outcome.err
    assert secret_file.read_text() == before


def test_timeout_bounds_every_call(
    endpoints: typing.Callable[..., Outcome], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that accepts the connection and never answers: the deadline ends the call."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{silent.getsockname()[1]}/v1")
        outcome = endpoints("--timeout", "0.5", "list")
    finally:
        silent.close()
    assert outcome.code == 1
    assert "did not answer GET" in outcome.err
    assert "within 0.5 s" in outcome.err


@pytest.mark.broker
async def test_setting_up_an_endpoint_end_to_end(
    standin: RunningStandIn,
    start_bridge: typing.Callable[..., typing.Any],
    broker: Broker,
    tmp_path: Path,
) -> None:
    """create writes the secret, serve reads it, test delivers through it into a queue."""
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    environment = {
        "OPENAI_API_KEY": standin.state.api_key,
        "OPENAI_BASE_URL": standin.base_url,
        "BRIDGE_SECRETS_DIR": str(secrets_dir),
    }
    created = await _command(
        environment, "create", "--url", "https://placeholder.example/", "--name", "bridge"
    )
    assert created.code == 0, created.err
    (endpoint,) = standin.state.endpoints.values()
    assert_no_secret_printed(created, standin.state)

    bridge = start_bridge(BRIDGE_SECRETS_DIR=str(secrets_dir), BRIDGE_WEBHOOK_SECRET=None)
    await bridge.wait_ready()
    queue = await broker.bind_queue(bridge.exchange, "batch.*")
    updated = await _command(environment, "update", endpoint.id, "--url", bridge.url)
    assert updated.code == 0, updated.err
    tested = await _command(environment, "test", endpoint.id, "--type", "batch.completed")
    assert tested.code == 0, tested.err
    assert f"sent a test batch.completed to {endpoint.id}; the endpoint answered 200" in tested.out
    message = await broker.get(queue)
    assert message.routing_key == "batch.completed"
    assert b'"type": "batch.completed"' in message.body

    wrong = standin.state.add_endpoint(url=bridge.url)
    refused = await _command(environment, "test", wrong, "--type", "batch.failed")
    assert refused.code == 1
    assert "answered 401" in refused.out
    assert await broker.drain(queue) == []


async def _command(environment: dict[str, str], *args: str) -> Outcome:
    """``webhook-bridge endpoints ARGS`` as a process (the test's own loop keeps running)."""
    base = {key: value for key, value in os.environ.items() if not key.startswith("BRIDGE_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "endpoints",
        *args,
        env=base | environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Outcome(process.returncode, out.decode(), err.decode())


def test_subscribable_event_types_are_the_sdks() -> None:
    from openai.types.webhooks.webhook_create_params import WebhookCreateParams

    (literal,) = typing.get_args(typing.get_type_hints(WebhookCreateParams)["event_types"])
    assert list(typing.get_args(literal)) == list(SUBSCRIBABLE_EVENT_TYPES)


async def test_the_standin_answers_what_the_openai_sdk_expects(
    aiohttp_server: typing.Callable[..., typing.Any],
) -> None:
    """Every route through the real SDK; each answer is exactly its SDK type's fields."""
    import openai
    from openai.types import webhooks as sdk

    state = OpenAIStandIn()
    server = await aiohttp_server(state.app())
    client = openai.AsyncOpenAI(
        api_key=state.api_key,
        base_url=str(server.make_url("/v1")),
        organization="org-sdk",
        project="proj_sdk",
        max_retries=0,
    )

    def exactly(model: type[typing.Any], raw: typing.Any) -> typing.Any:
        document = raw.http_response.json()
        required = {name for name, info in model.model_fields.items() if info.is_required()}
        assert required <= set(document) <= set(model.model_fields), model.__name__
        return model.model_validate(document)

    async with client:
        hooks = client.webhooks.with_raw_response
        created = exactly(
            sdk.WebhookEndpointWithSecret,
            await hooks.create(
                url="https://bridge.example.com/webhooks/openai",
                name="sdk",
                event_types=["batch.completed", "response.failed"],
            ),
        )
        assert created.signing_secret == state.endpoints[created.id].secret
        assert created.event_types == ["batch.completed", "response.failed"]
        retrieved = exactly(sdk.WebhookEndpoint, await hooks.retrieve(created.id))
        assert retrieved.id == created.id
        updated = exactly(sdk.WebhookEndpoint, await hooks.update(created.id, name="renamed"))
        assert updated.name == "renamed"
        page = exactly(sdk.WebhookEndpointList, await hooks.list(limit=5))
        assert [endpoint.id for endpoint in page.data] == [created.id]
        rotated = exactly(
            sdk.WebhookEndpointWithSecret,
            await hooks.rotate_secret(created.id, keep_old_secret_active_for_24_hours=True),
        )
        assert rotated.signing_secret != created.signing_secret
        assert state.endpoints[created.id].previous_secrets[0][0] == created.signing_secret
        # A delivery the stand-in itself refuses (no API key on it): 401, all on loopback.
        await hooks.update(created.id, url=str(server.make_url("/webhooks/openai")))
        tested = exactly(
            sdk.WebhookEndpointTestResult,
            await hooks.test(created.id, event_type="batch.completed"),
        )
        assert tested.webhook_endpoint_id == created.id
        assert tested.status_code == 401
        await hooks.update(created.id, url="https://bridge.example.com/webhooks/openai")
        with pytest.raises(openai.BadRequestError, match="only to loopback"):
            await client.webhooks.test(created.id, event_type="batch.completed")
        deleted = exactly(sdk.DeletedWebhookEndpoint, await hooks.delete(created.id))
        assert deleted.deleted

        for index in range(7):
            state.add_endpoint(name=f"paged-{index}")
        assert len([endpoint async for endpoint in client.webhooks.list(limit=3)]) == 7

        with pytest.raises(openai.NotFoundError, match="No webhook endpoint found"):
            await client.webhooks.delete("we_missing")
        state.rate_limited_calls = 1
        with pytest.raises(openai.RateLimitError) as rate_limited:
            await client.webhooks.retrieve("we_missing")
        assert rate_limited.value.response.headers["retry-after"] == "7"
    async with openai.AsyncOpenAI(
        api_key="sk-wrong", base_url=str(server.make_url("/v1")), max_retries=0
    ) as wrong:
        with pytest.raises(openai.AuthenticationError):
            await wrong.webhooks.list()
    headers = state.requests[0][2]
    assert headers["OpenAI-Organization"] == "org-sdk"
    assert headers["OpenAI-Project"] == "proj_sdk"


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("http://api.example.com/v1", "must be https:// except on loopback"),
        ("ftp://api.example.com/v1", "must be an https:// URL"),
        ("not a url", "must be an https:// URL"),
    ],
)
def test_the_api_key_is_never_sent_in_clear_beyond_loopback(
    endpoints: typing.Callable[..., Outcome],
    standin: RunningStandIn,
    monkeypatch: pytest.MonkeyPatch,
    base_url: str,
    expected: str,
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", base_url)
    outcome = endpoints("list")
    assert outcome.code == 2
    assert expected in outcome.err
    assert standin.state.requests == []


def test_a_missing_secrets_dir_is_refused_before_calling_openai(
    endpoints: typing.Callable[..., Outcome],
    standin: RunningStandIn,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("BRIDGE_SECRETS_DIR", str(tmp_path / "missing"))
    outcome = endpoints("create", "--url", "https://bridge.example.com/", "--name", "x")
    assert outcome.code == 2
    assert f"{tmp_path / 'missing'} is not a directory" in outcome.err
    assert standin.state.requests == []


def test_a_secret_that_cannot_be_written_says_what_to_do(
    endpoints: typing.Callable[..., Outcome],
    standin: RunningStandIn,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    def disk_full(_path: Path, _secrets: typing.Sequence[str]) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("bridge.secrets.write_secret_file", disk_full)
    endpoint_id = standin.state.add_endpoint()
    outcome = endpoints("rotate-secret", endpoint_id, "--secret-file", str(tmp_path / "s"))
    assert outcome.code == 1
    (line,) = outcome.err.strip().splitlines()
    assert "No space left on device" in line
    assert line.endswith("rotate it again once the file can be written")
    assert_no_secret_printed(outcome, standin.state)
