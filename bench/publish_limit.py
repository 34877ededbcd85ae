"""What the bridge's adaptive in-flight limit did during a point: its gauge, sampled."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

PUBLISH_LIMIT_GAUGE = "webhook_bridge_publish_limit"
SAMPLE_EVERY_S = 1.0
"""Often enough to see a limit held down for a second, rare enough to cost nothing."""


def gauge_value(metrics_text: str, name: str) -> float | None:
    """The value of an unlabelled gauge in a Prometheus exposition, if it is there."""
    for family in text_string_to_metric_families(metrics_text):
        if family.name == name and family.samples:
            return family.samples[0].value
    return None


async def watch_publish_limit(metrics_url: str, seen: list[int]) -> None:
    """Append the limit to ``seen`` every second until cancelled; a failed scrape is skipped."""
    timeout = aiohttp.ClientTimeout(total=SAMPLE_EVERY_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            try:
                async with session.get(metrics_url) as response:
                    value = gauge_value(await response.text(), PUBLISH_LIMIT_GAUGE)
                if value is not None:
                    seen.append(int(value))
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass  # a busy server's late or cut-off answer is no reason to fail the point
            await asyncio.sleep(SAMPLE_EVERY_S)
