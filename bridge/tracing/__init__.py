"""W3C trace context from the webhook request to the AMQP message and its consumer.

Every published message carries a valid ``traceparent`` header (and ``tracestate``
when there is one): the request's own, continued, or a new trace when the request
had none or a malformed one. That much is a few string operations per request and
needs no OpenTelemetry package. With the OpenTelemetry SDK installed (the ``otel``
extra) and an exporter configured through the standard ``OTEL_*`` variables,
:func:`from_environment` returns a tracer that also records spans for the request,
its signature verification and the publish up to the broker's confirm
(:mod:`bridge.tracing.otel`, imported only then).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from contextvars import ContextVar
from typing import NamedTuple, Protocol

from bridge.extras import DISTRIBUTION, installed
from bridge.settings import SettingsError

__all__ = [
    "TRACEPARENT",
    "TRACESTATE",
    "PropagationOnly",
    "RequestTrace",
    "SpanFactory",
    "TraceContext",
    "Tracing",
    "TracingConfigurationError",
    "current_trace",
    "from_environment",
    "handling",
    "incoming_context",
    "message_context",
    "new_trace",
    "parse_traceparent",
]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# W3C: platforms must propagate at least 512 characters of tracestate; longer ones
# may be dropped whole, which is what happens here.
MAX_TRACESTATE_LENGTH = 512
# Sampled: the bridge starts these traces without recording anything itself, and an
# unsampled root would make downstream parent-based samplers drop every trace.
NEW_TRACE_FLAGS = "01"

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_INVALID_TRACE_ID = "0" * 32
_INVALID_PARENT_ID = "0" * 16
_TRACESTATE_CHARACTERS = re.compile(r"[\x20-\x7e]*")
_NEVER_ZERO = 1 | 1 << 64  # the lowest bit of the parent id and of the trace id


class TracingConfigurationError(SettingsError):
    """The ``OTEL_*`` variables ask for something this installation cannot do."""


class TraceContext(NamedTuple):
    """A W3C ``traceparent`` (always valid here) and its optional ``tracestate``.

    A named tuple: one is made per request, and tuples are the cheapest to make.
    """

    traceparent: str
    tracestate: str | None = None

    @property
    def trace_id(self) -> str:
        return self.traceparent[3:35]

    @property
    def parent_id(self) -> str:
        return self.traceparent[36:52]

    def headers(self) -> dict[str, str]:
        """The AMQP (or HTTP) headers that carry this context."""
        if self.tracestate:
            return {TRACEPARENT: self.traceparent, TRACESTATE: self.tracestate}
        return {TRACEPARENT: self.traceparent}


def parse_traceparent(value: str) -> str | None:
    """``value`` as a version-00 ``traceparent``, or ``None`` when it is not a valid one.

    A later version is read by its version-00 prefix, as the W3C specification asks.
    """
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_id, parent_id, flags = match.groups()
    if version == "ff" or trace_id == _INVALID_TRACE_ID or parent_id == _INVALID_PARENT_ID:
        return None
    if version == "00" and len(value) != 55:
        return None
    if len(value) > 55 and value[55] != "-":
        return None
    return value if version == "00" and len(value) == 55 else f"00-{trace_id}-{parent_id}-{flags}"


def new_trace() -> TraceContext:
    # Random, as W3C asks, but not secret: the seeded generator is enough. The two set
    # bits keep both ids from being all zeros, which W3C reserves for "invalid".
    ids = f"{random.getrandbits(192) | _NEVER_ZERO:048x}"
    return TraceContext(f"00-{ids[:32]}-{ids[32:]}-{NEW_TRACE_FLAGS}")


def incoming_context(traceparents: list[str], tracestates: list[str]) -> TraceContext | None:
    """The context a request carries (header values as received), or ``None`` if it has
    none or an invalid one; a tracestate that cannot be forwarded is dropped on its own."""
    if len(traceparents) != 1:
        return None
    traceparent = parse_traceparent(traceparents[0].strip())
    if traceparent is None:
        return None
    tracestate = ",".join(value.strip() for value in tracestates if value.strip())
    if len(tracestate) > MAX_TRACESTATE_LENGTH or not _TRACESTATE_CHARACTERS.fullmatch(tracestate):
        tracestate = ""
    return TraceContext(traceparent, tracestate or None)


class RequestTrace(Protocol):
    """The trace of one webhook request, from its arrival to its answer."""

    def verifying(self) -> AbstractContextManager[None]: ...

    def publishing(self) -> AbstractContextManager[TraceContext]:
        """Around the publish up to the confirm; yields the context for the message.

        Entered only for an authentic webhook: the request's own trace context may be
        continued from here on, never before (see :mod:`bridge.tracing.otel`)."""
        ...

    def finish(self, status: int) -> None: ...


class Tracing(Protocol):
    def begin(self, traceparents: list[str], tracestates: list[str]) -> RequestTrace: ...

    def shutdown(self) -> None:
        """Flush what is still buffered (spans), at most for a few seconds."""
        ...


_NOTHING_TO_TIME: AbstractContextManager[None] = contextlib.nullcontext()


class _PropagatedTrace:
    """Its own ``publishing()`` context: nothing to time, only the context to hand out."""

    __slots__ = ("_context",)

    def __init__(self, context: TraceContext) -> None:
        self._context = context

    def verifying(self) -> AbstractContextManager[None]:
        return _NOTHING_TO_TIME

    def publishing(self) -> AbstractContextManager[TraceContext]:
        return self

    def __enter__(self) -> TraceContext:
        return self._context

    def __exit__(self, *_exception: object) -> None:
        return None

    def finish(self, status: int) -> None:
        pass


class PropagationOnly:
    """Carry the request's trace context (or a new one) into the message; record nothing.

    The bridge is then not a participant of its own in the trace: the message holds
    exactly the ``traceparent`` the request came with, as the W3C specification asks
    of intermediaries that do not trace.
    """

    def begin(self, traceparents: list[str], tracestates: list[str]) -> RequestTrace:
        return _PropagatedTrace(incoming_context(traceparents, tracestates) or new_trace())

    def shutdown(self) -> None:
        pass


def _exporting_requested(environ: Mapping[str, str]) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def from_environment(environ: Mapping[str, str] = os.environ) -> Tracing:
    """Spans when ``OTEL_TRACES_EXPORTER`` (or an OTLP endpoint) asks for them, else only
    propagation. Raises :class:`TracingConfigurationError` when spans are asked for but
    the SDK or the named exporter is not installed."""
    if not _exporting_requested(environ):
        return PropagationOnly()
    if not installed("opentelemetry.sdk"):
        raise TracingConfigurationError(
            "OTEL_TRACES_EXPORTER or an OTLP endpoint is set, but the OpenTelemetry SDK is "
            f"not installed: pip install '{DISTRIBUTION}[otel]', or unset them"
        )
    from bridge.tracing.otel import OpenTelemetryTracing

    return OpenTelemetryTracing.from_environment(environ)


SpanFactory = Callable[[TraceContext | None], AbstractContextManager[object]]
"""Opens the span of one message's handling, continuing ``context`` (see :mod:`.api`)."""

_handling: ContextVar[TraceContext | None] = ContextVar("bridge_tracing_handling", default=None)


def current_trace() -> TraceContext | None:
    """The trace context of the message whose handler is running (see ``EventConsumer.run``)."""
    return _handling.get()


def message_context(headers: Mapping[str, object]) -> TraceContext | None:
    """The trace context an AMQP message carries, or ``None`` without a valid one."""

    def values(name: str) -> list[str]:
        value = headers.get(name)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return [value] if isinstance(value, str) else []

    return incoming_context(values(TRACEPARENT), values(TRACESTATE))


@contextlib.contextmanager
def handling(context: TraceContext | None, span: SpanFactory | None) -> Iterator[None]:
    """Run the body as the handling of a message with ``context``: :func:`current_trace`
    returns it, and with OpenTelemetry's API installed ``span`` opens a consumer span
    that continues it (recorded when the process configured an SDK)."""
    token = _handling.set(context)
    try:
        if span is None:
            yield
        else:
            with span(context):
                yield
    finally:
        _handling.reset(token)
