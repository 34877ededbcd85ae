"""Consumer spans through OpenTelemetry's API alone: recorded only when the consuming
process has configured an SDK, and otherwise still the current span context inside the
handler, so that the handler's own instrumentation continues the message's trace."""

from __future__ import annotations

from contextlib import AbstractContextManager

from bridge.extras import MissingExtraError

try:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as missing:
    raise MissingExtraError(__name__, "otel") from missing

from bridge.tracing import SpanFactory, TraceContext

INSTRUMENTATION_NAME = "openai-webhook-bridge.consumer"

_propagator = TraceContextTextMapPropagator()


def consumer_spans(queue: str) -> SpanFactory:
    tracer = trace.get_tracer(INSTRUMENTATION_NAME)

    def span(context: TraceContext | None) -> AbstractContextManager[object]:
        parent = None if context is None else _propagator.extract(context.headers())
        return tracer.start_as_current_span(
            f"{queue} process",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "process",
                "messaging.destination.name": queue,
            },
        )

    return span
