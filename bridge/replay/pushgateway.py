"""Pushing a replay's counts to a Prometheus Pushgateway (a replay is a batch job)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, push_to_gateway

from bridge.replay.decision import Result
from bridge.replay.run import ReplaySummary

JOB = "webhook-bridge-replay"


def push_summary(gateway: str, summary: ReplaySummary, *, timeout: float = 10.0) -> None:
    """Replace this source's group on the gateway with the pass's counts.

    Grouped by source, so replays of different sources do not overwrite each other.
    Raises ``OSError`` (``urllib.error.URLError``) when the gateway cannot be reached.
    """
    registry = CollectorRegistry()
    messages = Counter(
        "webhook_bridge_replay_messages",
        "Messages a replay pass read, by what became of them.",
        ["source", "result"],
        registry=registry,
    )
    for result in Result:
        messages.labels(summary.source, result.value).inc(summary.count(result))
    push_to_gateway(
        gateway,
        job=JOB,
        registry=registry,
        grouping_key={"source": summary.source},
        timeout=timeout,
    )
