"""The HTTP ingress: verify each webhook, publish it, answer 2xx only after the broker confirmed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import StreamReader, hdrs, web
from aiohttp.web_protocol import RequestPayloadError

from bridge.dedup import Deduplicator, DedupRefused, OnStoreError, store_from_settings
from bridge.events import classify
from bridge.logs import RateLimitedLog
from bridge.metrics import (
    CONTENT_TYPE_LATEST,
    REJECTED_OUTCOMES,
    Metrics,
    RequestOutcome,
    SourceMetrics,
)
from bridge.publisher import (
    AmqpPublisher,
    BrokerUnavailable,
    Outcome,
    Publisher,
    Topology,
    route,
)
from bridge.settings import Settings, SettingsError
from bridge.signature import (
    MalformedWebhookHeaders,
    SignatureMismatch,
    SignatureVerifier,
    TimestampOutOfTolerance,
    WebhookHeaders,
    WebhookVerificationError,
)
from bridge.tracing import TRACEPARENT, TRACESTATE, PropagationOnly, RequestTrace, Tracing

logger = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhooks/openai"
OPERATIONS_PATHS = ("/healthz", "/readyz", "/metrics")
"""Served on BRIDGE_METRICS_PORT, or with the webhooks when it is 0."""
SERVER_OPTIONS: dict[str, Any] = {"auto_decompress": False}
"""How a server runs the webhook app: an encoded body is refused unread (415), so the server
never inflates one, whatever Content-Encoding it names (aiohttp would, as the bytes arrive)."""
TRACE_FLUSH_SECONDS = 5.0
METRICS_FLUSH_SECONDS = 1.0
"""How stale another worker's request counts may be in a scrape (see bridge.metrics)."""
REJECTION_LOG_RATE = 10.0
REJECTION_LOG_BURST = 20
SUPPRESSED_SUMMARY_SECONDS = 10.0
"""Rejected requests are logged at most 10 a second per outcome (bursts of 20) in each process,
so that whoever floods the public port does not also decide the volume of the logs; what is
held back is counted, and summed up every 10 s."""
JSON = "application/json"
IDENTITY = "identity"
_LOGGED_ID_LENGTH = 80


class Rejection(Exception):
    """A request answered with an error status; ``reason`` is safe to log and return."""

    def __init__(self, status: int, outcome: RequestOutcome, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.outcome = outcome
        self.reason = reason


@dataclass(slots=True)
class BodyBudget:
    """The bytes of request bodies the process holds at once, at most ``limit``
    (``BRIDGE_MAX_BUFFERED_BYTES``).

    A body with a Content-Length counts in full before its first byte is read: connections
    that stall in the middle of their bodies cannot add up to more than the limit.
    """

    limit: int
    held: int = 0

    def take(self, size: int) -> None:
        if self.held + size > self.limit:
            raise Rejection(
                503,
                RequestOutcome.OVER_BUFFER_BUDGET,
                "the bridge holds as many request bodies as it may; retry later",
            )
        self.held += size

    def give_back(self, size: int) -> None:
        self.held -= size


_VERIFICATION_STATUS: dict[type[WebhookVerificationError], tuple[int, RequestOutcome]] = {
    MalformedWebhookHeaders: (400, RequestOutcome.BAD_REQUEST),
    TimestampOutOfTolerance: (401, RequestOutcome.UNAUTHORIZED),
    SignatureMismatch: (401, RequestOutcome.UNAUTHORIZED),
}

_CLOSING_OUTCOMES = frozenset({RequestOutcome.TOO_LARGE, RequestOutcome.OVER_BUFFER_BUDGET})

_OUTCOME_OF_PUBLISH = {
    Outcome.PUBLISHED: RequestOutcome.PUBLISHED,
    Outcome.UNROUTED: RequestOutcome.UNROUTED,
    Outcome.QUARANTINED: RequestOutcome.QUARANTINED,
}


@dataclass(slots=True)  # built per request: a frozen one costs five times as much
class Delivery:
    """What one confirmed publish produced, shared with its duplicates."""

    outcome: Outcome
    event_type: str | None


@dataclass
class Ingress:
    """Everything a webhook request needs, built once per app."""

    settings: Settings
    publisher: Publisher
    topology: Topology
    verifiers: dict[str | None, SignatureVerifier]
    """By source name, or under ``None`` the single source's without BRIDGE_SOURCES; a
    reload swaps one entry."""
    metrics: Metrics
    dedup: Deduplicator[Delivery]
    tracing: Tracing
    budget: BodyBudget
    rejection_log: RateLimitedLog[RequestOutcome]
    shutting_down: bool = False
    _success_bodies: dict[RequestOutcome, bytes] = field(
        default_factory=lambda: {
            outcome: f'{{"outcome":"{outcome.value}"}}'.encode() for outcome in RequestOutcome
        }
    )

    async def handle(
        self, request: web.BaseRequest, trace: RequestTrace, path_source: str | None = None
    ) -> web.Response:
        """Answer a webhook posted to ``/webhooks/openai``, or to ``/webhooks/openai/<name>``
        (``path_source``: the name as the path gives it)."""
        received = time.monotonic()
        body = b""
        counts = self.metrics.unknown_source
        try:
            # Whatever can be refused without the body is, before a byte of it is read.
            source, verifier = self._source(path_source)
            counts = self.metrics.source(source)
            headers = self._check_before_body(request)
            signatures = verifier.check_headers(headers)
            body = await self._read_body(request)
            with trace.verifying():
                secret_index = verifier.match(headers, signatures, body)
            counts.secret_matched(secret_index)
            # Two projects' ids are not one namespace: each source deduplicates its own.
            key = headers.webhook_id if source is None else f"{source}:{headers.webhook_id}"
            delivery = await self.dedup.once(
                key, lambda: self._deliver(headers, body, trace, source)
            )
        except WebhookVerificationError as error:
            status, outcome = _VERIFICATION_STATUS[type(error)]
            return self._reject(request, Rejection(status, outcome, str(error)), counts)
        except Rejection as rejection:
            return self._reject(request, rejection, counts)
        except (BrokerUnavailable, DedupRefused) as error:
            return self._reject(
                request,
                Rejection(503, RequestOutcome.UNAVAILABLE, str(error) or "unavailable"),
                counts,
            )
        finally:
            self.budget.give_back(len(body))
        if delivery is None:
            outcome = RequestOutcome.DUPLICATE
        else:
            outcome = _OUTCOME_OF_PUBLISH[delivery.outcome]
            self.metrics.publish_took(time.monotonic() - received)
            if delivery.outcome is not Outcome.QUARANTINED:
                self.metrics.event_published(delivery.event_type or "")
        counts.count(outcome)
        return web.Response(body=self._success_bodies[outcome], content_type=JSON)

    def _source(self, path_source: str | None) -> tuple[str | None, SignatureVerifier]:
        """The source a request is for and the verifier of its secrets; 404 for none."""
        verifier = self.verifiers.get(path_source)
        if verifier is None:
            reason = (
                "no such source"
                if path_source is not None
                else f"sources are configured: post to {WEBHOOK_PATH}/<source>"
            )
            raise Rejection(404, RequestOutcome.UNKNOWN_SOURCE, reason)
        return path_source, verifier

    def _check_before_body(self, request: web.BaseRequest) -> WebhookHeaders:
        encoding = request.headers.get(hdrs.CONTENT_ENCODING)
        if encoding is not None and encoding.strip().lower() not in ("", IDENTITY):
            # OpenAI does not compress, and the signature covers the bytes as sent: inflating
            # an unauthenticated body could only cost memory and time.
            raise Rejection(
                415, RequestOutcome.UNSUPPORTED_ENCODING, "Content-Encoding must be identity"
            )
        declared = request.content_length
        limit = self.settings.max_body_bytes
        if declared is not None and declared > limit:
            raise Rejection(413, RequestOutcome.TOO_LARGE, f"body of {declared} bytes over {limit}")
        return WebhookHeaders.from_mapping(request.headers)

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        """The body, its bytes taken from the budget; the caller gives them back."""
        content = request.content
        if content.is_eof():
            # Received whole already: nothing to wait for, so nothing to time out.
            body = content.read_nowait()
            self._check_size(len(body))
            self.budget.take(len(body))
            return body
        declared = request.content_length
        try:
            async with asyncio.timeout(self.settings.body_timeout):
                if declared is None:
                    return await self._read_chunks(content)
                self.budget.take(declared)
                try:
                    return await request.read()
                except BaseException:
                    self.budget.give_back(declared)
                    raise
        except (RequestPayloadError, ConnectionResetError):
            # Cut short: the client went away, or its chunked framing broke.
            raise Rejection(400, RequestOutcome.BAD_REQUEST, "body could not be read") from None
        except TimeoutError:
            raise Rejection(
                408, RequestOutcome.BAD_REQUEST, "body not received within the time limit"
            ) from None

    async def _read_chunks(self, content: StreamReader) -> bytes:
        """A body of unknown length, taken from the budget chunk by chunk as it arrives."""
        body = bytearray()
        try:
            while chunk := await content.readany():
                self._check_size(len(body) + len(chunk))
                self.budget.take(len(chunk))
                body += chunk
        except BaseException:
            self.budget.give_back(len(body))
            raise
        return bytes(body)

    def _check_size(self, size: int) -> None:
        limit = self.settings.max_body_bytes
        if size > limit:
            raise Rejection(413, RequestOutcome.TOO_LARGE, f"body over {limit} bytes")

    async def _deliver(
        self, headers: WebhookHeaders, body: bytes, trace: RequestTrace, source: str | None
    ) -> Delivery:
        event = classify(body)
        if event.kind == "malformed":
            logger.warning(
                "quarantining authentic but malformed webhook",
                extra={"webhook_id": headers.webhook_id, "reason": event.reason},
            )
        with trace.publishing() as context:
            outcome = await self.publisher.publish(
                route(self.topology, headers, body, event, context, source=source)
            )
        return Delivery(outcome, event.event_type)

    def _reject(
        self, request: web.BaseRequest, rejection: Rejection, counts: SourceMetrics
    ) -> web.Response:
        counts.count(rejection.outcome)
        if self.rejection_log.allow(rejection.outcome):
            logger.warning(
                "webhook rejected",
                extra={
                    "status": rejection.status,
                    "reason": rejection.reason,
                    "webhook_id": request.headers.get("webhook-id", "")[:_LOGGED_ID_LENGTH],
                    "remote": request.remote,
                },
            )
        response = web.json_response(
            {"error": rejection.outcome.value, "detail": rejection.reason},
            status=rejection.status,
        )
        if rejection.status == 503:
            response.headers["Retry-After"] = str(self.settings.retry_after)
        elif rejection.status == 415:
            response.headers[hdrs.ACCEPT_ENCODING] = IDENTITY
        # Nothing more of an unread body is waited for, nor of a client sending too much.
        if rejection.outcome in _CLOSING_OUTCOMES or not request.content.is_eof():
            response.force_close()
        return response


INGRESS = web.AppKey("ingress", Ingress)
OWNED_PUBLISHER = web.AppKey("owned_publisher", AmqpPublisher)


async def receive_webhook(request: web.Request) -> web.Response:
    return await _receive(request.app[INGRESS], request, request.match_info.get("source"))


async def _receive(
    ingress: Ingress, request: web.BaseRequest, path_source: str | None = None
) -> web.Response:
    ingress.metrics.requests_in_flight += 1
    trace = ingress.tracing.begin(
        request.headers.getall(TRACEPARENT, []), request.headers.getall(TRACESTATE, [])
    )
    status = 500
    try:
        response = await ingress.handle(request, trace, path_source)
        status = response.status
        return response
    finally:
        trace.finish(status)
        ingress.metrics.requests_in_flight -= 1


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS]
    if ingress.shutting_down:
        return web.json_response({"status": "shutting down"}, status=503)
    if not ingress.publisher.ready:
        return web.json_response({"status": "broker not ready"}, status=503)
    if not ingress.dedup.ready:
        return web.json_response({"status": "deduplication store unavailable"}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS]
    _update_gauges(ingress)
    response = web.Response(body=ingress.metrics.exposition())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def _update_gauges(ingress: Ingress) -> None:
    ingress.metrics.set_broker_connected(ingress.publisher.connected)
    ingress.metrics.buffered_bytes.set(ingress.budget.held)


def rejection_log(
    on_suppressed: Callable[[RequestOutcome], None],
    *,
    log: logging.Logger = logger,
    clock: Callable[[], float] = time.monotonic,
) -> RateLimitedLog[RequestOutcome]:
    """The rate at which rejected requests are logged, per outcome (see REJECTION_LOG_RATE)."""
    return RateLimitedLog(
        log,
        REJECTED_OUTCOMES,
        what="rejected-request",
        kind_field="outcome",
        rate=REJECTION_LOG_RATE,
        burst=REJECTION_LOG_BURST,
        summary_seconds=SUPPRESSED_SUMMARY_SECONDS,
        on_suppressed=on_suppressed,
        clock=clock,
    )


def create_app(
    settings: Settings,
    publisher: Publisher | None = None,
    *,
    clock: Callable[[], float] = time.time,
    tracing: Tracing | None = None,
) -> web.Application:
    """Build the app; without a ``publisher`` it connects to ``settings.amqp_url`` itself.

    A publisher handed in stays the caller's to start and close. ``tracing`` (by
    default only trace context propagation) is shut down, flushing its spans, with the app.
    """
    app = web.Application(client_max_size=settings.max_body_bytes)
    request_metrics = Metrics(secret_count=len(settings.signing_keys), sources=settings.sources)
    owned_publisher = (
        AmqpPublisher(
            settings,
            on_connect=request_metrics.broker_connected_to,
            on_limit_change=request_metrics.publish_limit.set,
        )
        if publisher is None
        else None
    )
    chosen = publisher or owned_publisher
    assert chosen is not None
    app[INGRESS] = Ingress(
        settings=settings,
        publisher=chosen,
        topology=Topology.from_settings(settings),
        verifiers={
            name: SignatureVerifier(
                keys, tolerance_seconds=settings.timestamp_tolerance, clock=clock
            )
            for name, keys in _secrets_by_source(settings)
        },
        metrics=request_metrics,
        dedup=Deduplicator(
            store_from_settings(settings, request_metrics.dedup_store_seconds.observe),
            wait_seconds=settings.publish_timeout,
            on_store_error=OnStoreError(settings.dedup_on_error),
            record=request_metrics.dedup_result,
        ),
        tracing=tracing or PropagationOnly(),
        budget=BodyBudget(settings.max_buffered_bytes),
        rejection_log=rejection_log(request_metrics.log_line_suppressed),
    )
    if owned_publisher is not None:
        app[OWNED_PUBLISHER] = owned_publisher
        app.cleanup_ctx.append(_publisher_lifetime(owned_publisher))
    app.cleanup_ctx.append(_dedup_store_lifetime)
    app.cleanup_ctx.append(_metric_updates)
    app.on_shutdown.append(_mark_shutting_down)
    app.on_cleanup.append(_flush_traces)
    for source in settings.source_secrets:
        request_metrics.source(source.name).secret_count_changed(len(source.keys))
    app.router.add_post(WEBHOOK_PATH, receive_webhook)
    if settings.sources:
        app.router.add_post(f"{WEBHOOK_PATH}/{{source}}", receive_webhook)
    if not settings.metrics_port:
        _add_operations_routes(app)
    return app


def _secrets_by_source(settings: Settings) -> list[tuple[str | None, tuple[bytes, ...]]]:
    if not settings.sources:
        return [(None, settings.signing_keys)]
    if tuple(source.name for source in settings.source_secrets) != settings.sources:
        # Settings made without reading the sources' secrets would refuse every webhook.
        raise SettingsError("the sources' secrets were not read: use load_settings")
    return [(source.name, source.keys) for source in settings.source_secrets]


def create_operations_app(app: web.Application) -> web.Application:
    """``/healthz``, ``/readyz`` and ``/metrics`` of ``app``'s ingress, for the port of their
    own (``BRIDGE_METRICS_PORT``); ``app`` keeps the ingress's lifetime."""
    operations = web.Application()
    operations[INGRESS] = app[INGRESS]
    _add_operations_routes(operations)
    return operations


def _add_operations_routes(app: web.Application) -> None:
    for path, handler in zip(OPERATIONS_PATHS, (healthz, readyz, metrics), strict=True):
        app.router.add_get(path, handler)


def dispatch_webhooks_directly(server: web.Server, app: web.Application) -> None:
    """Have ``server`` hand webhook POSTs straight to ``app``'s ingress, and every other
    request to the handler it had (``app``'s routing).

    Resolving the route, freezing its match info and looking up the event loop cost
    about 5 % of the process's CPU per webhook (py-spy, 64 connections), and the webhook
    route needs none of it. A POST asking for ``100-continue``, or carrying a query
    string, still goes through the app, which answers the first and routes the second.
    An app with middleware or an ``on_response_prepare`` handler is left alone: a request
    that skips the routing skips those too.
    """
    if app.middlewares or app.on_response_prepare:
        return
    ingress = app[INGRESS]
    through_app = server.request_handler
    # Each source's path as it is sent: names are lowercase letters, digits and '-' only.
    paths: dict[str, str | None] = {WEBHOOK_PATH: None}
    paths.update((f"{WEBHOOK_PATH}/{name}", name) for name in ingress.verifiers if name)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "POST" and hdrs.EXPECT not in request.headers:
            path = request.raw_path
            if path in paths:
                return await _receive(ingress, request, paths[path])
        return await through_app(request)

    server.request_handler = handle


def _publisher_lifetime(
    publisher: AmqpPublisher,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(_app: web.Application) -> AsyncIterator[None]:
        await publisher.start()
        yield
        # cleanup_ctx exits after in-flight handlers finished; on_shutdown would be too early.
        await publisher.close()

    return lifetime


async def _dedup_store_lifetime(app: web.Application) -> AsyncIterator[None]:
    store = app[INGRESS].dedup.store
    await store.start()
    yield
    await store.close()


async def _metric_updates(app: web.Application) -> AsyncIterator[None]:
    """Keep the metrics current even in workers that are not being scraped, and write the
    summaries of suppressed rejected-request log lines when they are due."""
    ingress = app[INGRESS]

    async def update_every_second() -> None:
        while True:
            _update_gauges(ingress)
            ingress.metrics.flush()
            ingress.rejection_log.report_suppressed()
            await asyncio.sleep(METRICS_FLUSH_SECONDS)

    updater = asyncio.create_task(update_every_second())
    yield
    updater.cancel()
    ingress.rejection_log.report_suppressed(due_only=False)


async def _flush_traces(app: web.Application) -> None:
    # The SDK's shutdown blocks (it joins its export thread): in a daemon thread, left
    # behind at the deadline, so that an unreachable collector cannot hold the exit.
    loop = asyncio.get_running_loop()
    flushed = asyncio.Event()

    def shut_down() -> None:
        try:
            app[INGRESS].tracing.shutdown()
        finally:
            loop.call_soon_threadsafe(flushed.set)

    threading.Thread(target=shut_down, name="trace-flush", daemon=True).start()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(TRACE_FLUSH_SECONDS):
            await flushed.wait()


async def _mark_shutting_down(app: web.Application) -> None:
    app[INGRESS].shutting_down = True
