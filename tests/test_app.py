"""The HTTP contract, with a fake publisher (the broker side is in test_integration.py)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.app import (
    OPERATIONS_PATHS,
    REJECTION_LOG_BURST,
    REJECTION_LOG_RATE,
    SERVER_OPTIONS,
    WEBHOOK_PATH,
    create_app,
    create_operations_app,
    dispatch_webhooks_directly,
)
from bridge.metrics import REJECTED_OUTCOMES, RequestOutcome
from bridge.publisher import (
    QUARANTINE_REASON_HEADER,
    VALIDATED_HEADER,
    BrokerUnavailable,
    Outcome,
)
from bridge.samples import sample_body
from bridge.settings import Settings, SettingsError
from tests.conftest import AiohttpClient, Client, FakePublisher, Signer, make_settings
from tests.test_metrics import scrape


async def client_for(
    aiohttp_client: Callable[..., Awaitable[Client]], settings: Settings, publisher: FakePublisher
) -> Client:
    """A client of the app served as ``bridge serve`` serves it: with its server options,
    and webhook POSTs dispatched directly."""
    app = create_app(settings, publisher)
    server = TestServer(app)
    await server.start_server(**SERVER_OPTIONS)
    client = await aiohttp_client(server)
    dispatch_webhooks_directly(low_level_server(client), app)  # before its first connection
    return client


def low_level_server(client: Client) -> web.Server:
    runner = client.server.runner
    assert runner is not None
    assert runner.server is not None
    return runner.server


@pytest.fixture
def settings(signer: Signer) -> Settings:
    """One port, so that one client sees the webhooks and /healthz, /readyz and /metrics."""
    return make_settings(signer, metrics_port=0)


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient, settings: Settings, fake_publisher: FakePublisher
) -> Client:
    return await client_for(aiohttp_client, settings, fake_publisher)


async def test_known_event_is_published_with_its_exact_bytes(
    client: Client, signer: Signer, fake_publisher: FakePublisher, settings: Settings
) -> None:
    body = b'{"id":"evt_1", "object":"event","created_at":1750861210,"type":"batch.completed",'
    body += b'"data":{"id":"batch_1","new_field":[1,2]}}'
    headers = signer.headers(body)
    response = await client.post(WEBHOOK_PATH, data=body, headers=headers)
    assert response.status == 200
    assert await response.json() == {"outcome": "published"}
    [message] = fake_publisher.published
    assert message.body == body
    assert message.exchange == settings.exchange
    assert message.routing_key == "batch.completed"
    assert message.properties.message_id == headers["webhook-id"]
    assert message.properties.headers is not None
    assert message.properties.headers[VALIDATED_HEADER] is True


async def test_unknown_type_is_routed_by_type_and_flagged(
    client: Client, signer: Signer, fake_publisher: FakePublisher
) -> None:
    body = b'{"id":"evt_2","created_at":1750861210,"type":"video.completed","data":{}}'
    response = await client.post(WEBHOOK_PATH, data=body, headers=signer.headers(body))
    assert response.status == 200
    [message] = fake_publisher.published
    assert message.routing_key == "video.completed"
    assert message.properties.headers is not None
    assert message.properties.headers[VALIDATED_HEADER] is False


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b"[1,2]",
        b'{"id":"evt_3","created_at":1,"data":{}}',
        b'{"id":"evt_3","created_at":1,"type":"Batch.Completed","data":{}}',
        b'{"id":"evt_3","created_at":1,"type":"batch.completed","data":{}}',
    ],
    ids=["not-json", "not-utf8", "array", "no-type", "bad-type", "schema"],
)
async def test_authentic_malformed_event_is_quarantined_with_2xx(
    client: Client,
    signer: Signer,
    fake_publisher: FakePublisher,
    settings: Settings,
    body: bytes,
) -> None:
    response = await client.post(WEBHOOK_PATH, data=body, headers=signer.headers(body))
    assert response.status == 200
    assert await response.json() == {"outcome": "quarantined"}
    [message] = fake_publisher.published
    assert message.exchange == settings.quarantine_exchange
    assert message.exchange != settings.exchange
    assert message.body == body
    assert message.properties.headers is not None
    assert message.properties.headers[QUARANTINE_REASON_HEADER]


@pytest.mark.parametrize(
    ("mutate", "status"),
    [
        (lambda h: h.pop("webhook-id"), 400),
        (lambda h: h.pop("webhook-signature"), 400),
        (lambda h: h.update({"webhook-timestamp": "1.5"}), 400),
        (lambda h: h.update({"webhook-signature": "v1"}), 400),
        (lambda h: h.update({"webhook-signature": "v1," + "A" * 43 + "="}), 401),
        (lambda h: h.update({"webhook-timestamp": str(int(time.time()) - 3600)}), 401),
        (lambda h: h.update({"webhook-timestamp": str(int(time.time()) + 3600)}), 401),
    ],
    ids=["no-id", "no-signature", "float-ts", "no-comma", "mismatch", "old", "future"],
)
async def test_bad_headers_are_refused_without_publishing(
    client: Client,
    signer: Signer,
    fake_publisher: FakePublisher,
    mutate: object,
    status: int,
) -> None:
    body = sample_body("batch.completed")
    headers = signer.headers(body)
    mutate(headers)  # type: ignore[operator]
    response = await client.post(WEBHOOK_PATH, data=body, headers=headers)
    assert response.status == status
    assert (await response.json())["detail"]
    assert fake_publisher.published == []


async def test_signature_from_another_secret_is_401(
    client: Client, fake_publisher: FakePublisher
) -> None:
    body = sample_body("batch.completed")
    response = await client.post(WEBHOOK_PATH, data=body, headers=Signer().headers(body))
    assert response.status == 401
    assert fake_publisher.published == []


async def test_body_over_the_limit_is_413_before_reading_it(
    aiohttp_client: AiohttpClient, signer: Signer, fake_publisher: FakePublisher
) -> None:
    client = await client_for(
        aiohttp_client, make_settings(signer, max_body_bytes=2048), fake_publisher
    )
    body = b"{" + b" " * 4096 + b"}"
    response = await client.post(WEBHOOK_PATH, data=body, headers=signer.headers(body))
    assert response.status == 413
    assert fake_publisher.published == []


async def test_chunked_body_over_the_limit_is_413(
    aiohttp_client: AiohttpClient, signer: Signer, fake_publisher: FakePublisher
) -> None:
    client = await client_for(
        aiohttp_client, make_settings(signer, max_body_bytes=2048), fake_publisher
    )

    async def chunks() -> object:
        for _ in range(100):
            yield b" " * 1024

    response = await client.post(WEBHOOK_PATH, data=chunks(), headers=signer.headers(b""))
    assert response.status == 413
    assert fake_publisher.published == []


async def test_only_a_plain_webhook_post_skips_the_apps_routing(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    fake_publisher: FakePublisher,
    signer: Signer,
) -> None:
    app = create_app(settings, fake_publisher)
    client = await aiohttp_client(app)
    server = low_level_server(client)
    apps_handler, through_app = server.request_handler, []

    async def counted(request: web.BaseRequest) -> web.StreamResponse:
        through_app.append(f"{request.method} {request.raw_path}")
        return await apps_handler(request)

    server.request_handler = counted
    dispatch_webhooks_directly(server, app)

    body = sample_body("batch.completed")
    assert (await client.post(WEBHOOK_PATH, data=body, headers=signer.headers(body))).status == 200
    assert (await client.get("/healthz")).status == 200
    assert (await client.get(WEBHOOK_PATH)).status == 405
    assert (await client.post("/elsewhere", data=body)).status == 404
    with_query = sample_body("batch.failed")
    response = await client.post(
        f"{WEBHOOK_PATH}?source=openai", data=with_query, headers=signer.headers(with_query)
    )
    assert response.status == 200
    expecting = sample_body("batch.cancelled")
    response = await client.post(
        WEBHOOK_PATH, data=expecting, headers=signer.headers(expecting), expect100=True
    )
    assert response.status == 200
    assert through_app == [
        "GET /healthz",
        f"GET {WEBHOOK_PATH}",
        "POST /elsewhere",
        f"POST {WEBHOOK_PATH}?source=openai",
        f"POST {WEBHOOK_PATH}",
    ]
    assert [message.body for message in fake_publisher.published] == [body, with_query, expecting]


async def _add_a_header(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers["x-prepared"] = "1"


@pytest.mark.parametrize(
    "add_hook",
    [
        lambda app: app.middlewares.append(web.normalize_path_middleware()),
        lambda app: app.on_response_prepare.append(_add_a_header),
    ],
    ids=["middleware", "on_response_prepare"],
)
async def test_an_app_with_request_hooks_keeps_its_routing(
    settings: Settings,
    fake_publisher: FakePublisher,
    add_hook: Callable[[web.Application], None],
) -> None:
    app = create_app(settings, fake_publisher)
    add_hook(app)

    async def apps_handler(_request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    server = web.Server(apps_handler)
    dispatch_webhooks_directly(server, app)

    assert server.request_handler is apps_handler


async def test_other_methods_are_405(client: Client) -> None:
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        response = await client.request(method, WEBHOOK_PATH)
        assert response.status == 405, method


async def test_broker_unavailable_is_503_with_retry_after(
    client: Client, signer: Signer, fake_publisher: FakePublisher
) -> None:
    fake_publisher.error = BrokerUnavailable("no broker confirm within 5 s")
    body = sample_body("batch.completed")
    response = await client.post(WEBHOOK_PATH, data=body, headers=signer.headers(body))
    assert response.status == 503
    assert response.headers["Retry-After"] == "5"


async def test_health_and_readiness(client: Client, fake_publisher: FakePublisher) -> None:
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    fake_publisher.ready = False
    assert (await client.get("/readyz")).status == 503
    assert (await client.get("/healthz")).status == 200


async def test_concurrent_copies_of_one_webhook_publish_once(
    client: Client, signer: Signer, fake_publisher: FakePublisher
) -> None:
    fake_publisher.delay = 0.2
    body = sample_body("fine_tuning.job.failed")
    headers = signer.headers(body)
    responses = await asyncio.gather(
        *(client.post(WEBHOOK_PATH, data=body, headers=headers) for _ in range(20))
    )
    outcomes = sorted([(await response.json())["outcome"] for response in responses])
    assert [response.status for response in responses] == [200] * 20
    assert outcomes == ["duplicate"] * 19 + ["published"]
    assert len(fake_publisher.published) == 1


async def test_copies_share_a_failed_publish_and_a_later_retry_publishes(
    client: Client, signer: Signer, fake_publisher: FakePublisher
) -> None:
    fake_publisher.delay = 0.1
    fake_publisher.error = BrokerUnavailable("down")
    body = sample_body("batch.failed")
    headers = signer.headers(body)
    responses = await asyncio.gather(
        *(client.post(WEBHOOK_PATH, data=body, headers=headers) for _ in range(5))
    )
    assert [response.status for response in responses] == [503] * 5
    fake_publisher.error = None
    retry = await client.post(WEBHOOK_PATH, data=body, headers=headers)
    assert (await retry.json()) == {"outcome": "published"}
    assert len(fake_publisher.published) == 1


async def test_unrouted_outcome_is_reported(
    client: Client, signer: Signer, fake_publisher: FakePublisher
) -> None:
    fake_publisher.outcome = Outcome.UNROUTED
    body = sample_body("eval.run.failed")
    response = await client.post(WEBHOOK_PATH, data=body, headers=signer.headers(body))
    assert json.loads(await response.read()) == {"outcome": "unrouted"}


async def test_readiness_turns_503_as_soon_as_shutdown_begins(client: Client) -> None:
    assert (await client.get("/readyz")).status == 200
    await client.app.shutdown()
    response = await client.get("/readyz")
    assert response.status == 503
    assert await response.json() == {"status": "shutting down"}


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "gzip, identity", "x"])
async def test_an_encoded_body_is_refused_with_415(
    client: Client, signer: Signer, fake_publisher: FakePublisher, encoding: str
) -> None:
    body = gzip.compress(sample_body("batch.completed"))
    headers = {**signer.headers(body), "Content-Encoding": encoding}
    response = await client.post(WEBHOOK_PATH, data=body, headers=headers)
    assert response.status == 415
    assert response.headers["Accept-Encoding"] == "identity"
    assert (await response.json())["error"] == "unsupported_encoding"
    assert fake_publisher.published == []


async def test_identity_encoding_is_accepted(
    client: Client, signer: Signer, fake_publisher: FakePublisher
) -> None:
    body = sample_body("batch.completed")
    headers = {**signer.headers(body), "Content-Encoding": "Identity"}
    response = await client.post(WEBHOOK_PATH, data=body, headers=headers)
    assert response.status == 200
    assert [message.body for message in fake_publisher.published] == [body]


async def test_operations_move_to_their_own_app_when_given_a_port(
    aiohttp_client: AiohttpClient, signer: Signer, fake_publisher: FakePublisher
) -> None:
    app = create_app(make_settings(signer, metrics_port=9999), fake_publisher)
    webhooks = await aiohttp_client(app)
    operations = await aiohttp_client(create_operations_app(app))
    for path in OPERATIONS_PATHS:
        assert (await webhooks.get(path)).status == 404, path
        assert (await operations.get(path)).status == 200, path
    body = sample_body("batch.completed")
    response = await webhooks.post(WEBHOOK_PATH, data=body, headers=signer.headers(body))
    assert response.status == 200
    exposition = await (await operations.get("/metrics")).text()
    assert 'webhook_bridge_requests_total{outcome="published"} 1.0' in exposition
    assert (await operations.post(WEBHOOK_PATH, data=body)).status == 404
    fake_publisher.ready = False
    assert (await operations.get("/readyz")).status == 503


async def test_port_zero_keeps_operations_on_the_webhook_port(
    aiohttp_client: AiohttpClient, signer: Signer, fake_publisher: FakePublisher
) -> None:
    client = await aiohttp_client(create_app(make_settings(signer, metrics_port=0), fake_publisher))
    for path in OPERATIONS_PATHS:
        assert (await client.get(path)).status == 200, path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"port": 8080, "metrics_port": 8080}, "BRIDGE_METRICS_PORT (8080) is BRIDGE_PORT too"),
        (
            {"max_body_bytes": 4096, "max_buffered_bytes": 2048},
            "BRIDGE_MAX_BUFFERED_BYTES (2048) is below BRIDGE_MAX_BODY_BYTES (4096)",
        ),
    ],
    ids=["same-port", "budget-below-body"],
)
def test_settings_that_cannot_work_are_refused(
    signer: Signer, overrides: dict[str, int], message: str
) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        make_settings(signer, **overrides)


def test_defaults_keep_operations_apart_and_hold_many_of_the_largest_bodies() -> None:
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    assert defaults["metrics_port"] == 8081
    assert defaults["metrics_port"] != defaults["port"]
    assert defaults["max_buffered_bytes"] == 32 * 1024 * 1024
    assert defaults["max_buffered_bytes"] // defaults["max_body_bytes"] == 128


async def test_a_flood_of_rejected_requests_is_logged_within_the_rate_and_counted(
    client: Client, signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bridge.app")
    body = sample_body("batch.completed")
    forged = Signer().headers(body)
    flood = 100
    started = time.monotonic()
    for _ in range(flood):
        assert (await client.post(WEBHOOK_PATH, data=body, headers=forged)).status == 401
    elapsed = time.monotonic() - started
    compressed = {**signer.headers(body), "Content-Encoding": "gzip"}
    assert (await client.post(WEBHOOK_PATH, data=body, headers=compressed)).status == 415

    statuses = [record.__dict__.get("status") for record in caplog.records]
    logged = statuses.count(401)
    # A burst of 20, then 10 a second: whatever the flood's pace, not one line per request.
    assert REJECTION_LOG_BURST <= logged <= REJECTION_LOG_BURST + elapsed * REJECTION_LOG_RATE + 1
    assert statuses.count(415) == 1, "another outcome has a bucket of its own"
    samples = await scrape(client)
    suppressed = {
        outcome.value: samples[
            ("webhook_bridge_log_lines_suppressed_total", (("outcome", outcome.value),))
        ]
        for outcome in REJECTED_OUTCOMES
    }
    assert suppressed == {
        outcome.value: flood - logged if outcome is RequestOutcome.UNAUTHORIZED else 0
        for outcome in REJECTED_OUTCOMES
    }

    # What was held back is summed up every 10 s, and at the latest when the app stops.
    await client.close()
    summaries = [record for record in caplog.records if "suppressed" in record.__dict__]
    assert summaries
    assert sum(record.__dict__["suppressed"] for record in summaries) == flood - logged
    for summary in summaries:
        assert re.fullmatch(
            r"suppressed \d+ rejected-request log lines \(unauthorized\) in the last \d+ s",
            summary.getMessage(),
        )
