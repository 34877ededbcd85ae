"""Prometheus metrics.

One registry per app, so that tests never share counters. With several worker
processes (``BRIDGE_WORKERS``) every worker writes its values to files in
``PROMETHEUS_MULTIPROC_DIR`` and any worker's ``/metrics`` reports the sum of all.

What every request counts is tallied in plain integers and handed to prometheus_client
(whose every increment takes a lock, and in multiprocess mode writes a file) by
:meth:`Metrics.flush`: before each exposition, and once a second in every worker. A
scrape therefore sees its own worker exactly, and the other workers as of at most a
second before.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from bridge.events import KNOWN_EVENT_TYPES
from bridge.hydrate.mapping import hydration_for

MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

__all__ = [
    "CONTENT_TYPE_LATEST",
    "REJECTED_OUTCOMES",
    "DedupResult",
    "HydrationMetrics",
    "HydrationResult",
    "Metrics",
    "RequestOutcome",
]


class RequestOutcome(enum.StrEnum):
    PUBLISHED = "published"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"
    UNROUTED = "unrouted"
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    TOO_LARGE = "too_large"
    UNSUPPORTED_ENCODING = "unsupported_encoding"
    UNAVAILABLE = "unavailable"
    OVER_BUFFER_BUDGET = "over_buffer_budget"
    """Refused at once: its body would take the process over BRIDGE_MAX_BUFFERED_BYTES."""
    UNKNOWN_SOURCE = "unknown_source"
    """Posted to the path of no configured source (404), or with BRIDGE_SOURCES set to the
    path without one."""


_ANSWERED_2XX = frozenset(
    {
        RequestOutcome.PUBLISHED,
        RequestOutcome.DUPLICATE,
        RequestOutcome.QUARANTINED,
        RequestOutcome.UNROUTED,
    }
)
REJECTED_OUTCOMES = tuple(outcome for outcome in RequestOutcome if outcome not in _ANSWERED_2XX)
"""The outcomes of requests answered with an error status (each logged, within a rate)."""


class DedupResult(enum.StrEnum):
    NEW = "new"
    """This copy claimed the id and published it."""
    DUPLICATE = "duplicate"
    """Already confirmed, or shared the outcome of a copy in flight in this process."""
    WAITED = "waited"
    """Waited for a copy in flight at another pod (answered duplicate if it confirmed, else 503)."""
    STORE_ERROR = "store_error"
    """The store was unreachable: published unchecked, or refused with 503."""


class _Tally:
    """Increments of one counter child, not yet handed to it."""

    __slots__ = ("child", "pending")

    def __init__(self, child: Counter) -> None:
        self.child = child
        self.pending = 0

    def flush(self) -> None:
        if self.pending:
            self.child.inc(self.pending)
            self.pending = 0


class SourceMetrics:
    """What requests to one source count: ``source`` labels them when sources are set."""

    __slots__ = ("_metrics", "_outcome_tallies", "_secret_tallies", "labels")

    def __init__(self, metrics: Metrics, labels: dict[str, str], secret_count: int) -> None:
        self._metrics = metrics
        self.labels = labels
        self._outcome_tallies = {
            outcome: _Tally(metrics.requests.labels(outcome=outcome.value, **labels))
            for outcome in metrics.outcomes
        }
        self._secret_tallies: list[_Tally] = []
        self.secret_count_changed(secret_count)

    def count(self, outcome: RequestOutcome) -> None:
        self._outcome_tallies[outcome].pending += 1

    def secret_matched(self, index: int) -> None:
        self._secret_tallies[index].pending += 1

    def secret_count_changed(self, secret_count: int) -> None:
        """Have a ``secret_index`` child for every position of a reloaded list."""
        for index in range(len(self._secret_tallies), secret_count):
            self._secret_tallies.append(
                _Tally(self._metrics.secret_matches.labels(secret_index=str(index), **self.labels))
            )

    def secrets_reloaded(self, result: str) -> None:
        self._metrics.secret_reloads.labels(result=result, **self.labels).inc()

    def tallies(self) -> list[_Tally]:
        return [*self._outcome_tallies.values(), *self._secret_tallies]


SOURCE_LABEL = "source"


class Metrics:
    """The process's metrics; ``sources`` (``BRIDGE_SOURCES``) adds a ``source`` label to the
    request, secret-match and secret-reload counters, and without them they are as ever."""

    def __init__(self, secret_count: int, sources: Sequence[str] = ()) -> None:
        by_source = [SOURCE_LABEL] if sources else []
        self.outcomes = tuple(
            outcome
            for outcome in RequestOutcome
            if sources or outcome is not RequestOutcome.UNKNOWN_SOURCE
        )
        """The outcomes a request can have: without sources, none is for an unknown one."""
        shared_dir = os.environ.get(MULTIPROCESS_DIR_VARIABLE)
        self.registry = CollectorRegistry(auto_describe=True)
        if shared_dir is not None:
            MultiProcessCollector(self.registry, path=shared_dir)  # type: ignore[no-untyped-call]
        own_registry = None if shared_dir is not None else self.registry
        self.requests = Counter(
            "webhook_bridge_requests",
            "Webhook requests by how they were answered (and by source, with BRIDGE_SOURCES).",
            [*by_source, "outcome"],
            registry=own_registry,
        )
        self.published = Counter(
            "webhook_bridge_published",
            "Events confirmed by the broker, by event type (quarantined ones excluded).",
            ["event_type"],
            registry=own_registry,
        )
        self.publish_seconds = Histogram(
            "webhook_bridge_publish_seconds",
            "Time from receiving a webhook to the broker's confirm.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=own_registry,
        )
        self.in_flight = Gauge(
            "webhook_bridge_in_flight",
            "Webhook requests being processed.",
            multiprocess_mode="livesum",
            registry=own_registry,
        )
        self.buffered_bytes = Gauge(
            "webhook_bridge_buffered_bytes",
            "Bytes of request bodies held, or set aside for bodies being received "
            "(at most BRIDGE_MAX_BUFFERED_BYTES in each process).",
            multiprocess_mode="livesum",
            registry=own_registry,
        )
        self.publish_limit = Gauge(
            "webhook_bridge_publish_limit",
            "Unconfirmed publishes the process allows at once: the adaptive limit, "
            "at most BRIDGE_MAX_PUBLISHES_IN_FLIGHT.",
            multiprocess_mode="livesum",
            registry=own_registry,
        )
        self.broker_connected = Gauge(
            "webhook_bridge_broker_connected",
            "1 while the AMQP connection is open (in every worker), else 0.",
            multiprocess_mode="livemin",
            registry=own_registry,
        )
        self.broker_reconnects = Counter(
            "webhook_bridge_broker_reconnects",
            "Connections to a broker node made after the first one (reconnects and failovers).",
            registry=own_registry,
        )
        self.broker_node = Gauge(
            "webhook_bridge_broker_node_info",
            "1 for the broker node (host:port) the process is connected to.",
            ["node"],
            multiprocess_mode="livemax",
            registry=own_registry,
        )
        self.secret_matches = Counter(
            "webhook_bridge_secret_matches",
            "Verified webhooks by the position (0-based) of the configured secret that matched "
            "(and by source, with BRIDGE_SOURCES).",
            [*by_source, "secret_index"],
            registry=own_registry,
        )
        self.secret_reloads = Counter(
            "webhook_bridge_secret_reloads",
            "Changes of the webhook secrets file, by whether the new list was applied or refused "
            "(and by source, with BRIDGE_SOURCES).",
            [*by_source, "result"],
            registry=own_registry,
        )
        self.dedup_results = Counter(
            "webhook_bridge_dedup_results",
            "Verified webhooks by what deduplication decided.",
            ["result"],
            registry=own_registry,
        )
        self.dedup_store_seconds = Histogram(
            "webhook_bridge_dedup_store_seconds",
            "Latency of each call to the deduplication store (waits for other pods included).",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5),
            registry=own_registry,
        )
        self.log_lines_suppressed = Counter(
            "webhook_bridge_log_lines_suppressed",
            "Rejected-request log lines not written, because they came faster than each "
            "process logs them (a rate per outcome), by outcome.",
            ["outcome"],
            registry=own_registry,
        )
        self._suppressed_tallies = {
            outcome: _Tally(self.log_lines_suppressed.labels(outcome=outcome.value))
            for outcome in REJECTED_OUTCOMES
        }
        self._dedup_tallies = {
            result: _Tally(self.dedup_results.labels(result=result.value)) for result in DedupResult
        }
        self._broker_node: str | None = None
        self.single = SourceMetrics(self, {}, secret_count) if not sources else None
        """The counts of the one source at /webhooks/openai, without BRIDGE_SOURCES."""
        self.sources = {name: SourceMetrics(self, {SOURCE_LABEL: name}, 0) for name in sources}
        self.unknown_source = (
            self.single if self.single is not None else SourceMetrics(self, {SOURCE_LABEL: ""}, 0)
        )
        """Where requests to no configured source count (an empty ``source``: the path's
        name, chosen by whoever sends, is never a label)."""
        for each in self._source_metrics():
            for result in ("applied", "refused"):
                self.secret_reloads.labels(result=result, **each.labels)
        # Known types are exported from zero: a series born at 1 hides its first event from
        # rate() and increase() (tests/test_prometheus.py sees it through a real Prometheus).
        self._published_tallies = {
            event_type: _Tally(self.published.labels(event_type=event_type))
            for event_type in sorted(KNOWN_EVENT_TYPES)
        }
        self.requests_in_flight = 0
        self._publish_durations: list[float] = []

    def _source_metrics(self) -> list[SourceMetrics]:
        return list(self.sources.values()) if self.single is None else [self.single]

    def _counted(self) -> list[SourceMetrics]:
        if self.single is not None:
            return [self.single]
        return [*self.sources.values(), self.unknown_source]

    def source(self, name: str | None) -> SourceMetrics:
        """The counts of source ``name`` (``None``: the single source)."""
        if name is None:
            assert self.single is not None
            return self.single
        return self.sources[name]

    def event_published(self, event_type: str) -> None:
        tally = self._published_tallies.get(event_type)
        if tally is None:
            tally = self._published_tallies[event_type] = _Tally(
                self.published.labels(event_type=event_type)
            )
        tally.pending += 1

    def publish_took(self, seconds: float) -> None:
        self._publish_durations.append(seconds)

    def dedup_result(self, result: DedupResult) -> None:
        self._dedup_tallies[result].pending += 1

    def log_line_suppressed(self, outcome: RequestOutcome) -> None:
        self._suppressed_tallies[outcome].pending += 1

    def flush(self) -> None:
        """Hand every tally to prometheus_client."""
        source_tallies = [tally for each in self._counted() for tally in each.tallies()]
        for tallies in (
            source_tallies,
            self._published_tallies.values(),
            self._dedup_tallies.values(),
            self._suppressed_tallies.values(),
        ):
            for tally in tallies:
                tally.flush()
        durations, self._publish_durations = self._publish_durations, []
        for seconds in durations:
            self.publish_seconds.observe(seconds)
        self.in_flight.set(self.requests_in_flight)

    def set_broker_connected(self, connected: bool) -> None:
        self.broker_connected.set(1 if connected else 0)

    def broker_connected_to(self, node: str, reconnect: bool) -> None:
        """Name ``node`` as the one connected to, and count the connection if it replaces one."""
        if self._broker_node not in (None, node):
            self.broker_node.labels(node=self._broker_node).set(0)
        self.broker_node.labels(node=node).set(1)
        self._broker_node = node
        if reconnect:
            self.broker_reconnects.inc()

    def exposition(self) -> bytes:
        self.flush()
        return generate_latest(self.registry)


class HydrationResult(enum.StrEnum):
    PUBLISHED = "published"
    """The object was published, showing what its event says."""
    STALE = "stale"
    """Published with ``x-object-stale: true``: it never caught up with its event."""
    FAILED = "failed"
    """Recorded on ``<exchange>.objects.failed`` (404, no access, or the API kept failing)."""
    REQUEUED = "requeued"
    """Handed back to the queue for later: the API kept failing for now."""


class HydrationMetrics:
    """What ``webhook-bridge hydrate`` exposes on its ``/metrics``: one registry per worker."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.hydrations = Counter(
            "webhook_bridge_hydrations",
            "Events hydrated, by event type and result (published, stale, failed, requeued).",
            ["event_type", "result"],
            registry=self.registry,
        )
        self.api_seconds = Histogram(
            "webhook_bridge_hydrate_api_seconds",
            "Latency of each API call, by the HTTP status answered (0: none, timeout or "
            "connection error).",
            ["status"],
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.rate_limit_waits = Counter(
            "webhook_bridge_hydrate_rate_limit_waits",
            "API calls held back by a 429's Retry-After (the whole worker pauses).",
            registry=self.registry,
        )
        self.rate_limit_wait_seconds = Counter(
            "webhook_bridge_hydrate_rate_limit_wait_seconds",
            "Seconds API calls were held back by 429s, summed over the calls.",
            registry=self.registry,
        )
        self.retries = Counter(
            "webhook_bridge_hydrate_retries",
            "Fetches made again, by reason (rate_limited, server_error, timeout, stale).",
            ["reason"],
            registry=self.registry,
        )
        self.key_refused = Gauge(
            "webhook_bridge_hydrate_key_refused",
            "1 while the API refuses the worker's key (401, or 403 for every call): "
            "fetching has stopped and events stay queued.",
            registry=self.registry,
        )
        self.backlog = Gauge(
            "webhook_bridge_hydrate_backlog",
            "Events waiting in <exchange>.hydrate, as the broker last reported (every worker "
            "reports the same queue).",
            registry=self.registry,
        )
        for result in HydrationResult:
            for event_type in sorted(KNOWN_EVENT_TYPES):
                if hydration_for(event_type) is not None:
                    self.hydrations.labels(event_type=event_type, result=result.value)
        for reason in ("rate_limited", "server_error", "timeout", "stale"):
            self.retries.labels(reason=reason)
        self.api_seconds.labels(status="200")

    def hydrated(self, event_type: str, result: HydrationResult) -> None:
        self.hydrations.labels(event_type=event_type, result=result.value).inc()

    def api_call(self, status: int, seconds: float) -> None:
        self.api_seconds.labels(status=str(status)).observe(seconds)

    def held_by_rate_limit(self, seconds: float) -> None:
        self.rate_limit_waits.inc()
        self.rate_limit_wait_seconds.inc(seconds)

    def retried(self, reason: str) -> None:
        self.retries.labels(reason=reason).inc()

    def set_key_refused(self, refused: bool) -> None:
        self.key_refused.set(1 if refused else 0)

    def set_backlog(self, messages: int) -> None:
        self.backlog.set(messages)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
