"""W3C trace context: from the webhook request, through the broker, into the consumer's handler.

Spans are captured with the OpenTelemetry SDK's in-memory exporter; the end-to-end tests
publish through the real RabbitMQ and consume with :class:`bridge.consumer.EventConsumer`.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
)
from opentelemetry.trace import SpanKind, StatusCode

from bridge.app import WEBHOOK_PATH, create_app
from bridge.consumer import EventConsumer, WebhookEvent
from bridge.events import classify
from bridge.publisher import BrokerUnavailable, Topology, route
from bridge.replay import ReplayOptions, replay
from bridge.samples import sample_body
from bridge.settings import Settings
from bridge.signature import WebhookHeaders
from bridge.tracing import (
    TRACEPARENT,
    TRACESTATE,
    PropagationOnly,
    TraceContext,
    TracingConfigurationError,
    current_trace,
    from_environment,
    handling,
    incoming_context,
    message_context,
    new_trace,
    parse_traceparent,
)
from bridge.tracing.otel import OpenTelemetryTracing
from tests.conftest import (
    AMQP_URL,
    AiohttpClient,
    Broker,
    FakePublisher,
    Signer,
    bridge_environment,
    free_port,
    make_settings,
)
from tests.test_integration import wait_until_ready
from tests.test_replay import wait_for_count

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
INCOMING = f"00-{TRACE_ID}-{PARENT_ID}-01"


# ------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "value",
    [
        INCOMING,
        f"00-{TRACE_ID}-{PARENT_ID}-00",
    ],
)
def test_valid_traceparent_is_kept_as_is(value: str) -> None:
    assert parse_traceparent(value) == value


def test_a_later_version_is_read_by_its_version_00_prefix() -> None:
    assert parse_traceparent(f"cc-{TRACE_ID}-{PARENT_ID}-01-what-comes-next") == INCOMING
    assert parse_traceparent(f"cc-{TRACE_ID}-{PARENT_ID}-01") == INCOMING


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        INCOMING.upper(),
        f"00-{'0' * 32}-{PARENT_ID}-01",
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"ff-{TRACE_ID}-{PARENT_ID}-01",
        f"00-{TRACE_ID}-{PARENT_ID}-01-extra",
        f"00-{TRACE_ID}-{PARENT_ID}-1",
        f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",
        f"cc-{TRACE_ID}-{PARENT_ID}-01x",
        f"00_{TRACE_ID}_{PARENT_ID}_01",
        "00-" + "g" * 32 + f"-{PARENT_ID}-01",
    ],
)
def test_invalid_traceparent_is_refused(value: str) -> None:
    assert parse_traceparent(value) is None


def test_incoming_context_rules() -> None:
    assert incoming_context([], []) is None
    assert incoming_context([INCOMING, INCOMING], []) is None, "two traceparents are invalid"
    assert incoming_context(["nonsense"], ["vendor=1"]) is None
    assert incoming_context([f" {INCOMING} "], []) == TraceContext(INCOMING)
    # Several tracestate headers are one list; one that cannot be forwarded is dropped alone.
    assert incoming_context([INCOMING], ["a=1", "b=2"]) == TraceContext(INCOMING, "a=1,b=2")
    assert incoming_context([INCOMING], ["a=" + "x" * 600]) == TraceContext(INCOMING)
    assert incoming_context([INCOMING], ["a=\x00"]) == TraceContext(INCOMING)


def test_new_traces_are_valid_sampled_and_distinct() -> None:
    traces = {new_trace().traceparent for _ in range(100)}
    assert len(traces) == 100
    for value in traces:
        assert parse_traceparent(value) == value
        assert value.endswith("-01")


def test_message_context_reads_str_or_bytes_headers() -> None:
    assert message_context({TRACEPARENT: INCOMING, TRACESTATE: b"a=1"}) == TraceContext(
        INCOMING, "a=1"
    )
    assert message_context({TRACEPARENT: b"nonsense"}) is None
    assert message_context({}) is None


def test_route_puts_the_context_in_the_message_headers(signer: Signer, settings: Settings) -> None:
    body = sample_body("batch.completed")
    headers = WebhookHeaders.from_mapping(signer.headers(body))
    topology = Topology.from_settings(settings)
    traced = route(topology, headers, body, classify(body), TraceContext(INCOMING, "a=1"))
    assert traced.properties.headers[TRACEPARENT] == INCOMING
    assert traced.properties.headers[TRACESTATE] == "a=1"
    untraced = route(topology, headers, body, classify(body))
    value = untraced.properties.headers[TRACEPARENT]
    assert isinstance(value, str)
    assert parse_traceparent(value) == value
    assert TRACESTATE not in untraced.properties.headers


# ----------------------------------------------------------- configuration from OTEL_*


def test_without_otel_variables_only_propagation() -> None:
    assert isinstance(from_environment({}), PropagationOnly)
    assert isinstance(from_environment({"OTEL_TRACES_EXPORTER": "none"}), PropagationOnly)
    disabled = {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}
    assert isinstance(from_environment(disabled), PropagationOnly)


def test_otel_variables_turn_spans_on() -> None:
    tracing = from_environment({"OTEL_TRACES_EXPORTER": "console"})
    assert isinstance(tracing, OpenTelemetryTracing)
    tracing.shutdown()
    otlp = from_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert isinstance(otlp, OpenTelemetryTracing)
    otlp.shutdown()


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin_json_nonexistent"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"},
    ],
)
def test_an_exporter_that_is_not_installed_fails_closed(environ: dict[str, str]) -> None:
    with pytest.raises(TracingConfigurationError):
        from_environment(environ)


def test_asking_for_spans_without_the_sdk_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = __import__("importlib.util").util.find_spec

    def without_sdk(name: str, *args: object) -> object:
        return None if name.startswith("opentelemetry.sdk") else real_find_spec(name, *args)

    monkeypatch.setattr("importlib.util.find_spec", without_sdk)
    with pytest.raises(TracingConfigurationError, match=r"openai-webhook-bridge\[otel\]"):
        from_environment({"OTEL_TRACES_EXPORTER": "otlp"})


def test_serving_without_otel_variables_imports_no_opentelemetry() -> None:
    """The request path of a bridge without tracing configured never loads OpenTelemetry."""
    script = """
import asyncio, sys
from aiohttp.test_utils import TestClient, TestServer
from bridge.app import create_app
from bridge.server import tracing_from_environment
from bridge.settings import load_settings
from tests.conftest import FakePublisher, Signer

async def main():
    signer = Signer()
    settings = load_settings(secrets_dir=None, webhook_secret=signer.secret)
    app = create_app(settings, FakePublisher(), tracing=tracing_from_environment())
    async with TestClient(TestServer(app)) as client:
        body = b'{"id": "evt_1", "type": "batch.completed", "created_at": 1, "data": {"id": "b"}}'
        response = await client.post("/webhooks/openai", data=body, headers=signer.headers(body))
        assert response.status == 200, response.status
    print(sorted(name for name in sys.modules if name.startswith("opentelemetry")))

asyncio.run(main())
"""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "BRIDGE_"))}
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------- the HTTP path


async def _post(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    publisher: FakePublisher,
    signer: Signer,
    trace_headers: dict[str, str],
    tracing: OpenTelemetryTracing | None = None,
) -> int:
    client = await aiohttp_client(create_app(settings, publisher, tracing=tracing))
    body = sample_body("batch.completed")
    response = await client.post(
        WEBHOOK_PATH, data=body, headers={**signer.headers(body), **trace_headers}
    )
    return response.status


def _published_context(publisher: FakePublisher) -> TraceContext:
    (message,) = publisher.published
    context = message_context(message.properties.headers)
    assert context is not None
    return context


async def test_incoming_trace_is_continued_into_the_message(
    aiohttp_client: AiohttpClient, settings: Settings, fake_publisher: FakePublisher, signer: Signer
) -> None:
    trace_headers = {TRACEPARENT: INCOMING, TRACESTATE: "vendor=opaque"}
    assert await _post(aiohttp_client, settings, fake_publisher, signer, trace_headers) == 200
    assert _published_context(fake_publisher) == TraceContext(INCOMING, "vendor=opaque")


@pytest.mark.parametrize(
    "trace_headers",
    [{}, {TRACEPARENT: "00-nonsense"}, {TRACEPARENT: INCOMING.upper(), TRACESTATE: "a=1"}],
    ids=["absent", "malformed", "uppercase"],
)
async def test_without_a_valid_trace_a_new_one_starts_and_the_request_succeeds(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    fake_publisher: FakePublisher,
    signer: Signer,
    trace_headers: dict[str, str],
) -> None:
    assert await _post(aiohttp_client, settings, fake_publisher, signer, trace_headers) == 200
    context = _published_context(fake_publisher)
    assert parse_traceparent(context.traceparent) == context.traceparent
    assert context.trace_id != TRACE_ID
    assert context.tracestate is None, "a tracestate without a valid traceparent is dropped"


# --------------------------------------------------------------------------- spans


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def _recording(exporter: InMemorySpanExporter, sampler: Sampler) -> OpenTelemetryTracing:
    """Spans straight to memory; the app shuts the tracing down with itself."""
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OpenTelemetryTracing(provider)


@pytest.fixture
def recording(exporter: InMemorySpanExporter) -> OpenTelemetryTracing:
    """The SDK's default sampler, ``parentbased_always_on``."""
    return _recording(exporter, ParentBased(ALWAYS_ON))


# OTEL_TRACES_SAMPLER=parentbased_always_off: nothing of its own, and (before verification was
# a trust boundary) whatever a parent marked sampled.
SAMPLES_NOTHING = ParentBased(ALWAYS_OFF)


def _spans(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert len(spans) == len(exporter.get_finished_spans()), "one span per name"
    return spans


def _hex_ids(span: ReadableSpan) -> tuple[str, str]:
    context = span.get_span_context()
    assert context is not None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


async def test_spans_for_request_verification_and_publish_link_and_continue_the_request(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    fake_publisher: FakePublisher,
    signer: Signer,
    exporter: InMemorySpanExporter,
    recording: OpenTelemetryTracing,
) -> None:
    trace_headers = {TRACEPARENT: INCOMING, TRACESTATE: "vendor=opaque"}
    status = await _post(aiohttp_client, settings, fake_publisher, signer, trace_headers, recording)
    assert status == 200
    spans = _spans(exporter)
    assert set(spans) == {"POST /webhooks/openai", "verify signature", "publish"}
    request, verify, publish = (
        spans["POST /webhooks/openai"],
        spans["verify signature"],
        spans["publish"],
    )
    assert request.kind is SpanKind.SERVER
    assert publish.kind is SpanKind.PRODUCER
    # Before the signature is checked the request's context is only a link: the request's
    # span is the root of a trace of the bridge's own.
    assert request.parent is None
    request_trace, request_span = _hex_ids(request)
    assert request_trace != TRACE_ID
    (link,) = request.links
    assert (f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}") == (
        TRACE_ID,
        PARENT_ID,
    )
    assert link.context.is_remote
    assert verify.parent is not None
    assert verify.parent.span_id == int(request_span, 16)
    assert _hex_ids(verify)[0] == request_trace
    # Once verified, the publish continues the request's trace and links back to the bridge's.
    assert publish.parent is not None
    assert f"{publish.parent.span_id:016x}" == PARENT_ID
    assert _hex_ids(publish)[0] == TRACE_ID
    (back,) = publish.links
    assert _hex_ids(request) == (f"{back.context.trace_id:032x}", f"{back.context.span_id:016x}")
    assert request.attributes is not None
    assert request.attributes["http.response.status_code"] == 200
    # The message's parent is the publish span: the consumer's spans hang below it.
    publish_trace, publish_span = _hex_ids(publish)
    assert _published_context(fake_publisher) == TraceContext(
        f"00-{publish_trace}-{publish_span}-01", "vendor=opaque"
    )


@pytest.mark.parametrize(("flags", "published_flags"), [("01", "00"), ("03", "02")])
async def test_a_sampled_flag_cannot_make_the_bridge_record(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    fake_publisher: FakePublisher,
    signer: Signer,
    exporter: InMemorySpanExporter,
    flags: str,
    published_flags: str,
) -> None:
    """Flag 01 under a sampler that samples nothing of its own: nothing is recorded, and the
    message carries the request's trace unsampled, the bridge's decision (W3C's "random
    trace id" bit, 02, still describes the request's trace id)."""
    tracing = _recording(exporter, SAMPLES_NOTHING)
    sampled = f"00-{TRACE_ID}-{PARENT_ID}-{flags}"
    status = await _post(
        aiohttp_client, settings, fake_publisher, signer, {TRACEPARENT: sampled}, tracing
    )
    assert status == 200
    assert exporter.get_finished_spans() == ()
    published = _published_context(fake_publisher)
    assert published.trace_id == TRACE_ID
    assert published.traceparent.endswith(f"-{published_flags}")


async def test_an_unsampled_flag_cannot_stop_the_bridge_recording(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    fake_publisher: FakePublisher,
    signer: Signer,
    exporter: InMemorySpanExporter,
    recording: OpenTelemetryTracing,
) -> None:
    """Flag 00 under an always-on sampler: every span is recorded, the message says sampled."""
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"
    status = await _post(
        aiohttp_client, settings, fake_publisher, signer, {TRACEPARENT: unsampled}, recording
    )
    assert status == 200
    assert set(_spans(exporter)) == {"POST /webhooks/openai", "verify signature", "publish"}
    published = _published_context(fake_publisher)
    assert published.trace_id == TRACE_ID
    assert published.traceparent.endswith("-01")


@pytest.mark.parametrize("refusal", ["wrong secret", "stale timestamp", "malformed headers"])
async def test_an_unverified_request_cannot_force_sampling(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    fake_publisher: FakePublisher,
    signer: Signer,
    exporter: InMemorySpanExporter,
    refusal: str,
) -> None:
    tracing = _recording(exporter, SAMPLES_NOTHING)
    client = await aiohttp_client(create_app(settings, fake_publisher, tracing=tracing))
    body = sample_body("batch.completed")
    headers = {
        "wrong secret": Signer().headers(body),
        "stale timestamp": signer.headers(body, timestamp=1),
        "malformed headers": {**signer.headers(body), "webhook-signature": "v1"},
    }[refusal]
    for _ in range(3):
        response = await client.post(
            WEBHOOK_PATH, data=body, headers={**headers, TRACEPARENT: INCOMING}
        )
        assert response.status in (400, 401)
    assert exporter.get_finished_spans() == ()
    assert fake_publisher.published == []


async def test_a_request_without_context_is_the_root_of_a_new_trace(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    fake_publisher: FakePublisher,
    signer: Signer,
    exporter: InMemorySpanExporter,
    recording: OpenTelemetryTracing,
) -> None:
    malformed = {TRACEPARENT: "00-xyz"}
    status = await _post(aiohttp_client, settings, fake_publisher, signer, malformed, recording)
    assert status == 200
    spans = _spans(exporter)
    assert spans["POST /webhooks/openai"].parent is None
    trace_id = _hex_ids(spans["POST /webhooks/openai"])[0]
    assert _published_context(fake_publisher).trace_id == trace_id


async def test_refused_and_failed_requests_are_recorded(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    signer: Signer,
    exporter: InMemorySpanExporter,
    recording: OpenTelemetryTracing,
) -> None:
    failing = FakePublisher(error=BrokerUnavailable("no confirm"))
    client = await aiohttp_client(create_app(settings, failing, tracing=recording))
    body = sample_body("batch.completed")
    wrong_secret = Signer().headers(body)
    assert (await client.post(WEBHOOK_PATH, data=body, headers=wrong_secret)).status == 401
    refused = _spans(exporter)
    assert set(refused) == {"POST /webhooks/openai", "verify signature"}
    assert refused["verify signature"].status.status_code is StatusCode.ERROR
    exporter.clear()

    assert (await client.post(WEBHOOK_PATH, data=body, headers=signer.headers(body))).status == 503
    failed = _spans(exporter)
    assert failed["publish"].status.status_code is StatusCode.ERROR
    assert failed["POST /webhooks/openai"].status.status_code is StatusCode.ERROR
    attributes = failed["POST /webhooks/openai"].attributes
    assert attributes is not None
    assert attributes["http.response.status_code"] == 503


# ------------------------------------------------- end to end, through RabbitMQ


async def _consume_one(
    settings: Settings, queue: str, started: asyncio.Event
) -> tuple[WebhookEvent, TraceContext | None, str]:
    """Run a consumer until one event arrives; what the handler saw of its trace context."""
    seen: asyncio.Future[tuple[WebhookEvent, TraceContext | None, str]] = (
        asyncio.get_running_loop().create_future()
    )

    async def handler(event: WebhookEvent) -> None:
        span_context = trace.get_current_span().get_span_context()
        seen.set_result((event, current_trace(), f"{span_context.trace_id:032x}"))

    async with EventConsumer(
        AMQP_URL, exchange=settings.exchange, patterns=["batch.*"], queue=queue
    ) as consumer:
        started.set()
        running = asyncio.create_task(consumer.run(handler))
        try:
            async with asyncio.timeout(15):
                return await seen
        finally:
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running


@pytest.mark.broker
@pytest.mark.parametrize("spans", [False, True], ids=["propagation-only", "with-sdk"])
async def test_trace_context_reaches_the_consumer_handler_through_rabbitmq(
    aiohttp_client: AiohttpClient,
    broker: Broker,
    broker_topology: Topology,
    signer: Signer,
    exporter: InMemorySpanExporter,
    recording: OpenTelemetryTracing,
    spans: bool,
) -> None:
    settings = make_settings(signer, exchange=broker_topology.exchange)
    client = await aiohttp_client(create_app(settings, tracing=recording if spans else None))
    await wait_until_ready(client)
    queue = f"{settings.exchange}.consumer"
    broker.created_queues.append(queue)
    started = asyncio.Event()
    consuming = asyncio.create_task(_consume_one(settings, queue, started))
    await started.wait()

    body = sample_body("batch.completed")
    headers = {**signer.headers(body), TRACEPARENT: INCOMING, TRACESTATE: "vendor=opaque"}
    assert (await client.post(WEBHOOK_PATH, data=body, headers=headers)).status == 200
    event, handled_context, handler_trace_id = await consuming

    assert event.type == "batch.completed"
    assert json.loads(body)["id"] == event.id
    assert handled_context is not None
    assert handled_context.trace_id == TRACE_ID
    assert handled_context.tracestate == "vendor=opaque"
    # OpenTelemetry's current span inside the handler continues the same trace.
    assert handler_trace_id == TRACE_ID
    if spans:
        publish = _spans(exporter)["publish"]
        assert handled_context.parent_id == _hex_ids(publish)[1]
    else:
        assert handled_context.traceparent == INCOMING


@pytest.mark.broker
async def test_replay_keeps_the_original_trace(
    aiohttp_client: AiohttpClient,
    broker: Broker,
    broker_topology: Topology,
    settings: Settings,
    signer: Signer,
) -> None:
    """An event replayed from the unrouted queue still carries the request's trace context."""
    client = await aiohttp_client(create_app(settings))
    await wait_until_ready(client)
    body = sample_body("batch.completed")
    headers = {**signer.headers(body), TRACEPARENT: INCOMING, TRACESTATE: "vendor=opaque"}
    assert (await client.post(WEBHOOK_PATH, data=body, headers=headers)).status == 200
    await wait_for_count(broker, broker_topology.unrouted_exchange, 1)

    billing = await broker.bind_queue(settings.exchange, "batch.*")
    summary = await replay(settings, ReplayOptions("unrouted"))
    assert summary.replayed == 1
    (copy,) = await broker.drain(billing)
    assert copy.body == body
    assert message_context(copy.headers) == TraceContext(INCOMING, "vendor=opaque")


def test_serve_refuses_to_start_with_an_exporter_it_does_not_have(signer: Signer) -> None:
    environ = bridge_environment(
        signer, "test.unused", free_port(), OTEL_TRACES_EXPORTER="zipkin_json_nonexistent"
    )
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "serve"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "zipkin_json_nonexistent" in result.stderr
    assert signer.secret not in result.stdout + result.stderr


async def test_handlers_see_the_message_context_without_opentelemetry() -> None:
    """Without OpenTelemetry's API there is no span, but ``current_trace()`` still works."""
    context = TraceContext(INCOMING, "a=1")
    assert current_trace() is None
    with handling(context, None):
        await asyncio.sleep(0)
        assert current_trace() == context
    assert current_trace() is None
