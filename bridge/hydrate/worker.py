"""The hydration worker: each thin event in, its object out, nothing lost on the way.

Events come from ``<exchange>.hydrate`` through :class:`bridge.consumer.EventConsumer`
(its idempotency store skips an event whose object was already published, and its retry
queues hand events back without the broker counting a redelivery). For each event the
worker fetches the object (:mod:`bridge.hydrate.api`) at the worker's shared pace
(:mod:`bridge.hydrate.pace`) and publishes the API's exact bytes to ``<exchange>.objects``
with publisher confirms, routed by the event type. The event is acknowledged only after
that confirm, or after its failure record on ``<exchange>.objects.failed`` is confirmed.

What the API answers decides the rest:

======================  ===========================================================
429                     every call of the worker waits out ``Retry-After``; retried
5xx, timeout            retried with back-off and jitter, ``BRIDGE_HYDRATE_ATTEMPTS``
                        times; then handed back to the queue for later, and after
                        ``BRIDGE_HYDRATE_REQUEUES`` hand-backs recorded as failed
404, 403, other 4xx     recorded as failed (the event's bytes and headers, the reason
                        in ``x-hydrate-failure``), then acknowledged
401 (or 403 three       fetching stops, ``/readyz`` answers 503, events stay queued;
times in a row)         the key is tried again every ``BRIDGE_HYDRATE_AUTH_RETRY`` s
object behind event     fetched again ``BRIDGE_HYDRATE_STALE_ATTEMPTS`` times, then
                        published with ``x-object-stale: true``
======================  ===========================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable
from typing import Any, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractRobustConnection,
    DeliveryMode,
)
from aiohttp import web

from bridge.consumer import (
    RETRY_COUNT_HEADER,
    ROUTING_KEY_HEADER,
    Delivery,
    EventConsumer,
    IdempotencyStore,
    InMemoryIdempotencyStore,
    connect_to_a_node,
)
from bridge.consumer.retry import BROKER_HEADERS
from bridge.frames import APP_ID
from bridge.hydrate.fetching import ApiFailure, FailureKind, Fetcher
from bridge.hydrate.mapping import Hydration, hydration_for
from bridge.hydrate.pace import Pace
from bridge.hydrate.settings import HydrateSettings
from bridge.hydrate.topology import prepare_topology
from bridge.metrics import CONTENT_TYPE_LATEST, HydrationMetrics, HydrationResult
from bridge.sources import SOURCE_HEADER

logger = logging.getLogger(__name__)

EVENT_ID_HEADER = "x-event-id"
EVENT_TYPE_HEADER = "x-event-type"
OBJECT_TYPE_HEADER = "x-object-type"
STALE_HEADER = "x-object-stale"
FAILURE_HEADER = "x-hydrate-failure"
FAILURE_STATUS_HEADER = "x-hydrate-status"
OBJECT_HEADERS = (
    "webhook-id",
    EVENT_ID_HEADER,
    EVENT_TYPE_HEADER,
    OBJECT_TYPE_HEADER,
    SOURCE_HEADER,
    "traceparent",
    "tracestate",
    STALE_HEADER,
)
"""Every header an object's message may carry."""
MAX_BACKOFF = 30.0
FORBIDDEN_IN_A_ROW_IS_THE_KEY = 3
"""403s for different objects in a row, with no success between, that mean the key (a
restricted key without the read scope) rather than the objects."""
BACKLOG_INTERVAL = 10.0
"""Seconds between reads of the hydration queue's depth for the backlog metric."""
DEFAULT_RATE_LIMIT_PAUSE = 1.0
"""Seconds every call waits after a 429 without ``Retry-After``."""

# Headers of a message's trips through retry queues and dead-lettering: not the event's.
_NOT_THE_EVENTS = frozenset({RETRY_COUNT_HEADER, ROUTING_KEY_HEADER, *BROKER_HEADERS})
_TRACE_HEADERS = ("traceparent", "tracestate")
T = TypeVar("T")
_BROKER_FAILURES = (aiormq.exceptions.AMQPError, ConnectionError, TimeoutError, RuntimeError)


class HydrationWorker:
    """Consumes ``<exchange>.hydrate`` until :meth:`stop`; see the module's table.

    ``idempotency`` remembers the events whose object was published (this process's
    memory unless given; workers sharing the queue need a store they share)."""

    def __init__(
        self,
        settings: HydrateSettings,
        fetcher: Fetcher,
        *,
        idempotency: IdempotencyStore | None = None,
        metrics: HydrationMetrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._names = settings.names
        self._fetcher = fetcher
        self._idempotency = idempotency or InMemoryIdempotencyStore()
        self.metrics = metrics or HydrationMetrics()
        self._rng = rng or random.Random()  # noqa: S311  # jitter, not secrets
        self._pace = Pace(settings.hydrate_rate)
        self._key_accepted = asyncio.Event()
        self._key_accepted.set()
        self._forbidden_in_a_row = 0
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._objects: AbstractExchange | None = None
        self._failed: AbstractExchange | None = None
        self._unrouted: AbstractExchange | None = None
        self._consuming = False
        self._stop = asyncio.Event()

    @property
    def ready(self) -> bool:
        """Consuming, connected, and the API takes the key."""
        return self.not_ready_reason is None

    @property
    def not_ready_reason(self) -> str | None:
        if not self._consuming:
            return "not consuming yet"
        connection, channel = self._connection, self._channel
        if connection is None or connection.is_closed or not connection.connected.is_set():
            return "not connected to the broker"
        if channel is None or channel.is_closed:
            return "the publishing channel is closed"
        if not self._key_accepted.is_set():
            return "the API refuses the key; fetching has stopped"
        return None

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Declare (or check) the topology, then hydrate until :meth:`stop`; in-flight
        events finish first, for at most ``BRIDGE_HYDRATE_API_TIMEOUT`` seconds."""
        settings = self._settings
        timeout = settings.publish_timeout
        async with contextlib.AsyncExitStack() as stack:
            async with asyncio.timeout(timeout * 3):
                connection = await connect_to_a_node(
                    settings.amqp_url.get_secret_value(),
                    aio_pika.connect_robust,
                    attempt_seconds=timeout,
                    ca_file=settings.amqp_ca_file,
                )
                stack.push_async_callback(connection.close)
                await prepare_topology(connection, settings)
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                self._objects = await channel.get_exchange(self._names.objects, ensure=False)
                self._failed = await channel.get_exchange(self._names.failed, ensure=False)
                self._unrouted = await channel.get_exchange(
                    self._names.objects_unrouted, ensure=False
                )
            self._connection, self._channel = connection, channel
            consumer = EventConsumer(
                settings.amqp_url.get_secret_value(),
                patterns=["#"],
                exchange=settings.exchange,
                queue=self._names.queue,
                prefetch=settings.hydrate_concurrency,
                quorum=True,
                idempotency=self._idempotency,
                ca_file=settings.amqp_ca_file,
                timeout=timeout,
                declare=False,
            )
            await stack.enter_async_context(consumer)
            logger.info(
                "hydrating events from %s into %s (at most %g calls/s, %d at once)",
                self._names.queue,
                self._names.objects,
                settings.hydrate_rate,
                settings.hydrate_concurrency,
            )
            self._consuming = True
            watching = asyncio.create_task(self._watch_backlog(connection))
            try:
                await self._consume(consumer)
            finally:
                self._consuming = False
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching

    async def _watch_backlog(self, connection: AbstractRobustConnection) -> None:
        """Have ``webhook_bridge_hydrate_backlog`` follow the queue's depth."""
        while True:
            with contextlib.suppress(*_BROKER_FAILURES):
                async with (
                    asyncio.timeout(self._settings.publish_timeout),
                    connection.channel() as channel,
                ):
                    queue = await channel.declare_queue(self._names.queue, passive=True)
                    self.metrics.set_backlog(queue.declaration_result.message_count or 0)
            await asyncio.sleep(BACKLOG_INTERVAL)

    async def _consume(self, consumer: EventConsumer) -> None:
        free = asyncio.Semaphore(self._settings.hydrate_concurrency)
        in_flight: set[asyncio.Task[None]] = set()
        deliveries = aiter(consumer)
        try:
            # A free slot first, so that a message is taken only when it can start.
            while await self._unless_stopped(free.acquire()):
                delivery = await self._unless_stopped(anext(deliveries))
                if delivery is None:
                    free.release()
                    break
                task = asyncio.create_task(self._hydrate(delivery))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                task.add_done_callback(lambda _: free.release())
        finally:
            if in_flight:
                await asyncio.wait(in_flight, timeout=self._settings.hydrate_api_timeout)
            for task in in_flight:
                task.cancel()

    async def _unless_stopped(self, work: Awaitable[T]) -> T | None:
        """``work``'s result, or ``None`` (``work`` cancelled) once :meth:`stop` is called."""
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not task.done():
                task.cancel()
                # Until it has ended, the generator it advanced counts as running.
                await asyncio.wait({task})
        if task.cancelled() or (self._stop.is_set() and task.exception() is not None):
            return None
        return task.result()

    async def _hydrate(self, delivery: Delivery) -> None:
        context = {"message_id": delivery.message_id, "routing_key": delivery.routing_key}
        try:
            await self._hydrate_one(delivery)
        except asyncio.CancelledError:
            raise
        except _BROKER_FAILURES as error:
            # Unsettled, the message is redelivered once the connection is back.
            logger.warning("could not settle an event: %s", _describe(error), extra=context)
        except Exception:
            logger.exception("hydrating an event failed; handing it back", extra=context)
            with contextlib.suppress(*_BROKER_FAILURES):
                await delivery.retry(self._settings.hydrate_requeue_delay)

    async def _hydrate_one(self, delivery: Delivery) -> None:
        event = delivery.event
        event_type = event.type
        hydration = hydration_for(event_type)
        object_id = _object_id(event.data)
        if hydration is None or object_id is None:
            await self._record_failure(delivery, "not_hydratable", 0)
            return
        source = _text_header(delivery, SOURCE_HEADER)
        failures = stale_fetches = 0
        probing_key = False
        while True:
            if not probing_key:
                await self._key_accepted.wait()
            held = await self._pace.slot()
            if held > 0:
                self.metrics.held_by_rate_limit(held)
            try:
                body = await self._fetch(hydration, object_id, source)
            except ApiFailure as failure:
                kind = failure.kind
                if kind == FailureKind.RATE_LIMITED:
                    self.metrics.retried(kind)
                    self._pace.pause(
                        DEFAULT_RATE_LIMIT_PAUSE
                        if failure.retry_after is None
                        else failure.retry_after
                    )
                    continue
                if kind in (FailureKind.SERVER_ERROR, FailureKind.TIMEOUT):
                    failures += 1
                    if failures < self._settings.hydrate_attempts:
                        self.metrics.retried(kind)
                        await asyncio.sleep(self._backoff(failures))
                        continue
                    await self._give_up_for_now(delivery, kind, failure.status)
                    return
                if self._key_refused(failure):
                    self._stop_fetching(failure)
                    probing_key = True
                    await asyncio.sleep(self._settings.hydrate_auth_retry)
                    continue
                self._forbidden_in_a_row += kind == FailureKind.FORBIDDEN
                await self._record_failure(delivery, kind, failure.status)
                return
            self._key_works()
            document = _json_object(body)
            if document is None:
                await self._record_failure(delivery, "not_an_object", 200)
                return
            expected = hydration.expected_status(event_type)
            stale = expected is not None and document.get("status") != expected
            if stale and stale_fetches < self._settings.hydrate_stale_attempts:
                stale_fetches += 1
                self.metrics.retried("stale")
                await asyncio.sleep(self._backoff(stale_fetches))
                continue
            await self._publish_object(delivery, body, document, stale=stale)
            return

    async def _fetch(self, hydration: Hydration, object_id: str, source: str | None) -> bytes:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            answer = await self._fetcher.fetch(hydration, object_id, source)
        except ApiFailure as failure:
            self.metrics.api_call(failure.status, loop.time() - started)
            raise
        self.metrics.api_call(answer.status, loop.time() - started)
        return answer.body

    def _key_refused(self, failure: ApiFailure) -> bool:
        if failure.kind == FailureKind.UNAUTHORIZED:
            return True
        return (
            failure.kind == FailureKind.FORBIDDEN
            and self._forbidden_in_a_row + 1 >= FORBIDDEN_IN_A_ROW_IS_THE_KEY
        )

    def _stop_fetching(self, failure: ApiFailure) -> None:
        if self._key_accepted.is_set():
            self._key_accepted.clear()
            self.metrics.set_key_refused(True)
            logger.error(
                "the API refuses the key (%s): hydration stopped, events stay queued; "
                "set a valid OPENAI_API_KEY (trying it again every %g s)",
                failure,
                self._settings.hydrate_auth_retry,
            )

    def _key_works(self) -> None:
        self._forbidden_in_a_row = 0
        if not self._key_accepted.is_set():
            self._key_accepted.set()
            self.metrics.set_key_refused(False)
            logger.info("the API accepts the key again: hydration resumed")

    def _backoff(self, failures: int) -> float:
        ceiling = min(self._settings.hydrate_backoff * 2 ** (failures - 1), MAX_BACKOFF)
        return self._rng.uniform(ceiling / 2, ceiling)

    async def _give_up_for_now(self, delivery: Delivery, kind: str, status: int) -> None:
        if delivery.retries >= self._settings.hydrate_requeues:
            await self._record_failure(delivery, kind, status)
            return
        logger.warning(
            "the API kept failing (%s); trying the event again in %g s",
            kind,
            self._settings.hydrate_requeue_delay,
            extra={"message_id": delivery.message_id, "routing_key": delivery.routing_key},
        )
        await delivery.retry(self._settings.hydrate_requeue_delay)
        self.metrics.hydrated(delivery.event.type, HydrationResult.REQUEUED)

    async def _publish_object(
        self, delivery: Delivery, body: bytes, document: dict[str, Any], *, stale: bool
    ) -> None:
        event = delivery.event
        headers: dict[str, aio_pika.abc.FieldValue] = {
            "webhook-id": delivery.message_id or "",
            EVENT_ID_HEADER: event.id,
            EVENT_TYPE_HEADER: event.type,
            OBJECT_TYPE_HEADER: str(document.get("object", "")),
        }
        source = _text_header(delivery, SOURCE_HEADER)
        if source is not None:
            headers[SOURCE_HEADER] = source
        for name in _TRACE_HEADERS:
            value = _text_header(delivery, name)
            if value is not None:
                headers[name] = value
        if stale:
            headers[STALE_HEADER] = True
        message = aio_pika.Message(
            body,
            headers=headers,
            content_type="application/json",
            delivery_mode=DeliveryMode.PERSISTENT,
            message_id=delivery.message_id,
            type=event.type,
            app_id=APP_ID,
        )
        await self._confirmed(self._objects, message, event.type)
        await delivery.ack()
        result = HydrationResult.STALE if stale else HydrationResult.PUBLISHED
        self.metrics.hydrated(event.type, result)

    async def _record_failure(self, delivery: Delivery, reason: str, status: int) -> None:
        """The event's exact bytes and headers on the failed exchange, then acknowledged."""
        message = delivery.message
        headers = {
            name: value for name, value in message.headers.items() if name not in _NOT_THE_EVENTS
        }
        headers[FAILURE_HEADER] = reason
        headers[FAILURE_STATUS_HEADER] = status
        record = aio_pika.Message(
            message.body,
            headers=headers,
            content_type=message.content_type,
            delivery_mode=DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            timestamp=message.timestamp,
            type=message.type,
            app_id=message.app_id,
        )
        await self._confirmed(self._failed, record, delivery.event.type)
        logger.warning(
            "recorded an event whose object could not be fetched (%s)",
            reason,
            extra={"message_id": delivery.message_id, "routing_key": delivery.routing_key},
        )
        await delivery.ack()
        self.metrics.hydrated(delivery.event.type, HydrationResult.FAILED)

    async def _confirmed(
        self, exchange: AbstractExchange | None, message: aio_pika.Message, routing_key: str
    ) -> None:
        if exchange is None or self._unrouted is None:
            raise RuntimeError("the worker is not running")
        timeout = self._settings.publish_timeout
        async with asyncio.timeout(timeout):
            try:
                await exchange.publish(message, routing_key, mandatory=True, timeout=timeout)
            except aio_pika.exceptions.DeliveryError:
                if exchange is not self._objects:
                    raise
                # Returned even via the alternate exchange: its link is missing (operator-
                # managed topology), so keep the object there directly.
                await self._unrouted.publish(message, routing_key, mandatory=True)


def operations_app(worker: HydrationWorker) -> web.Application:
    """``/healthz``, ``/readyz`` (503 with the reason when not ready) and ``/metrics``."""

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_request: web.Request) -> web.Response:
        reason = worker.not_ready_reason
        if reason is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {reason}\n")

    async def metrics(_request: web.Request) -> web.Response:
        response = web.Response(body=worker.metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


def _object_id(data: object) -> str | None:
    value = data.get("id") if isinstance(data, dict) else getattr(data, "id", None)
    return value if isinstance(value, str) and value else None


def _json_object(body: bytes) -> dict[str, Any] | None:
    """The object read (never re-encoded: the body is published as it is)."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _text_header(delivery: Delivery, name: str) -> str | None:
    value = delivery.message.headers.get(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
