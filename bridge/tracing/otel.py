"""Spans through the OpenTelemetry SDK; imported only when exporting is configured.

The provider is built from the standard variables: ``OTEL_TRACES_EXPORTER``
(default ``otlp``; several comma-separated), ``OTEL_EXPORTER_OTLP_PROTOCOL`` /
``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` (default ``http/protobuf``), the OTLP
endpoint and header variables (read by the exporter itself), ``OTEL_SERVICE_NAME``
and ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and its argument, and the
``OTEL_BSP_*`` batching variables.

An incoming ``traceparent`` is anyone's to write, so it is never the parent of a span
opened before the signature is verified: the request's span is a root, sampled by the
process's own sampler, with the incoming context as a link. Only the ``publish`` span,
which starts after the signature is verified and the id deduplicated, continues the
incoming trace, and it follows the request span's sampling decision, not the sender's
flag. The message therefore carries the trace id (and ``tracestate``) of an authentic
webhook, as without spans, and the bridge's own sampling decision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points

from bridge.extras import DISTRIBUTION, MissingExtraError

try:
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
    from opentelemetry.trace import (
        Link,
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        StatusCode,
        TraceFlags,
        Tracer,
    )
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as missing:
    raise MissingExtraError(__name__, "otel") from missing

from bridge.tracing import (
    TRACEPARENT,
    TRACESTATE,
    RequestTrace,
    TraceContext,
    TracingConfigurationError,
    incoming_context,
    new_trace,
)

INSTRUMENTATION_NAME = "openai-webhook-bridge"
DEFAULT_SERVICE_NAME = "openai-webhook-bridge"
REQUEST_SPAN = "POST /webhooks/openai"
VERIFY_SPAN = "verify signature"
PUBLISH_SPAN = "publish"
_EXPORTER_GROUP = "opentelemetry_traces_exporter"
_OTLP_BY_PROTOCOL = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}
_INSTALLED_BY = {
    "otlp_proto_http": f"{DISTRIBUTION}[otel]",
    "otlp_proto_grpc": "opentelemetry-exporter-otlp-proto-grpc",
}
SHUTDOWN_TIMEOUT_MILLIS = 5000

_propagator = TraceContextTextMapPropagator()


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    names = [name.strip() for name in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    resolved = []
    for name in filter(None, names):
        if name == "otlp":
            if protocol not in _OTLP_BY_PROTOCOL:
                raise TracingConfigurationError(f"unsupported OTLP protocol {protocol!r}")
            name = _OTLP_BY_PROTOCOL[protocol]
        resolved.append(name)
    return resolved


def _exporter(name: str) -> SpanExporter:
    found = list(entry_points(group=_EXPORTER_GROUP, name=name))
    if not found:
        package = _INSTALLED_BY.get(name)
        raise TracingConfigurationError(
            f"span exporter {name!r} (OTEL_TRACES_EXPORTER) is not installed"
            + (f": pip install '{package}'" if package else "")
        )
    exporter: SpanExporter = found[0].load()()
    return exporter


def provider_from_environment(environ: Mapping[str, str]) -> TracerProvider:
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: DEFAULT_SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in _exporter_names(environ):
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    return provider


def _message_context(context: Context) -> TraceContext:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=context)
    if TRACEPARENT not in carrier:
        return new_trace()
    return TraceContext(carrier[TRACEPARENT], carrier.get(TRACESTATE))


_ROOT = Context()
"""An empty context: a span started in it is the root of a new trace."""


class _RecordedTrace:
    __slots__ = ("_context", "_incoming", "_span", "_tracer")

    def __init__(self, tracer: Tracer, incoming: SpanContext | None) -> None:
        self._tracer = tracer
        self._incoming = incoming
        self._span = tracer.start_span(
            REQUEST_SPAN,
            context=_ROOT,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": "POST", "http.route": "/webhooks/openai"},
            links=() if incoming is None else (Link(incoming),),
        )
        self._context = trace.set_span_in_context(self._span)

    def verifying(self) -> contextlib.AbstractContextManager[None]:
        return self._child(VERIFY_SPAN, SpanKind.INTERNAL)

    @contextlib.contextmanager
    def _child(self, name: str, kind: SpanKind) -> Iterator[None]:
        with self._tracer.start_as_current_span(name, context=self._context, kind=kind):
            yield

    @contextlib.contextmanager
    def publishing(self) -> Iterator[TraceContext]:
        with self._tracer.start_as_current_span(
            PUBLISH_SPAN,
            context=self._publish_parent(),
            kind=SpanKind.PRODUCER,
            attributes={"messaging.system": "rabbitmq", "messaging.operation.type": "send"},
            links=() if self._incoming is None else (Link(self._span.get_span_context()),),
        ) as span:
            yield _message_context(trace.set_span_in_context(span))

    def _publish_parent(self) -> Context:
        """The request's span; or, for a webhook that came with a trace context, that
        context (only now, the signature verified) carrying the request span's sampling
        decision instead of the sender's."""
        incoming = self._incoming
        if incoming is None:
            return self._context
        # Only the sampled bit is the bridge's: the others (W3C's "random trace id") describe
        # the incoming trace id, which the bridge's own flags do not.
        sampled = self._span.get_span_context().trace_flags & TraceFlags.SAMPLED
        continued = SpanContext(
            incoming.trace_id,
            incoming.span_id,
            is_remote=True,
            trace_flags=TraceFlags(incoming.trace_flags & ~TraceFlags.SAMPLED | sampled),
            trace_state=incoming.trace_state,
        )
        return trace.set_span_in_context(NonRecordingSpan(continued))

    def finish(self, status: int) -> None:
        self._span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self._span.set_status(StatusCode.ERROR)
        self._span.end()


class OpenTelemetryTracing:
    """Spans for each request (a root, linked to the request's own trace context), its
    verification, and its publish (continuing the request's trace context)."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer(INSTRUMENTATION_NAME)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> OpenTelemetryTracing:
        return cls(provider_from_environment(environ))

    def begin(self, traceparents: list[str], tracestates: list[str]) -> RequestTrace:
        incoming = incoming_context(traceparents, tracestates)
        if incoming is None:
            return _RecordedTrace(self._tracer, None)
        remote = trace.get_current_span(_propagator.extract(incoming.headers()))
        return _RecordedTrace(self._tracer, remote.get_span_context())

    def shutdown(self) -> None:
        self._provider.force_flush(SHUTDOWN_TIMEOUT_MILLIS)
        self._provider.shutdown()
