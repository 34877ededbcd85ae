"""Redriving stored events: ``webhook-bridge replay`` from the unrouted, quarantine and
dead-letter queues, any named queue, or the archive stream."""

from bridge.replay.decision import (
    REPLAYED_AT_HEADER,
    REPLAYED_FROM_HEADER,
    Filters,
    Result,
    Target,
)
from bridge.replay.pushgateway import push_summary
from bridge.replay.run import (
    NAMED_SOURCES,
    ReplayError,
    ReplayOptions,
    ReplaySummary,
    replay,
    source_queue,
)
from bridge.replay.when import parse_when

__all__ = [
    "NAMED_SOURCES",
    "REPLAYED_AT_HEADER",
    "REPLAYED_FROM_HEADER",
    "Filters",
    "ReplayError",
    "ReplayOptions",
    "ReplaySummary",
    "Result",
    "Target",
    "parse_when",
    "push_summary",
    "replay",
    "source_queue",
]
