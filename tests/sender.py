"""A webhook sender that behaves like OpenAI's: it retries every non-2xx and connection error."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from bridge.samples import new_webhook_id, sample_body
from tests.conftest import Signer

EVENT_TYPES = (
    "batch.completed",
    "fine_tuning.job.failed",
    "realtime.call.incoming",
    "response.completed",
    "eval.run.failed",
)


@dataclass
class DeliveryReport:
    """What the sender saw: the ids that got a 2xx, every status, and what it gave up on."""

    accepted: set[str] = field(default_factory=set)
    accepted_attempts: list[tuple[float, float]] = field(default_factory=list)
    """(sent, answered) monotonic times of each attempt answered with a 2xx."""
    accepted_bodies: dict[str, tuple[float, bytes]] = field(default_factory=dict)
    """When each accepted id was answered 2xx, and its body: to deliver it again."""
    statuses: Counter[int] = field(default_factory=Counter)
    connection_errors: int = 0
    given_up: set[str] = field(default_factory=set)

    @property
    def server_errors_other_than_503(self) -> dict[int, int]:
        return {status: n for status, n in self.statuses.items() if status >= 500 and status != 503}

    def longest_2xx_gap_after(self, moment: float) -> float:
        """The longest wait for a 2xx answer from ``moment`` on: until the first, or between
        two successive ones."""
        answered = sorted(end for _start, end in self.accepted_attempts if end >= moment)
        return max((b - a for a, b in itertools.pairwise([moment, *answered])), default=0.0)

    def first_2xx_sent_after(self, moment: float) -> float:
        """Seconds from ``moment`` to the answer of the first 2xx'd attempt sent after it."""
        answered = [end for start, end in self.accepted_attempts if start >= moment]
        assert answered, "no request sent after that moment got a 2xx"
        return min(answered) - moment


def assert_nothing_lost(report: DeliveryReport, in_queue: list[str]) -> None:
    assert report.accepted, "the sender got no 2xx at all"
    assert report.server_errors_other_than_503 == {}
    assert report.accepted <= set(in_queue), "a 2xx'd event is missing from the queue"


@dataclass
class OpenAILikeSender:
    """Sends fresh events until stopped; each is retried with backoff until 2xx or deadline.

    Like OpenAI, a retry keeps the ``webhook-id`` and body and is signed with a new timestamp.
    """

    url: str
    signer: Signer
    concurrency: int = 8
    retry_deadline: float = 60.0
    max_backoff: float = 1.0
    report: DeliveryReport = field(default_factory=DeliveryReport)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _abandon: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[DeliveryReport] | None = None
    _progress: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self) -> DeliveryReport:
        """Run until :meth:`stop`; then finish (or give up on) the events already started."""
        timeout = aiohttp.ClientTimeout(total=30)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(
                *(self._worker(session, index) for index in range(self.concurrency))
            )
        return self.report

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def finish(self, *, abandon: bool = False) -> DeliveryReport:
        """Send no new events and wait for the sender; with ``abandon``, stop retrying the
        ones under way too."""
        self._stop.set()
        if abandon:
            self._abandon.set()
        assert self._task is not None, "start() first"
        return await self._task

    async def wait_accepted(self, count: int, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout), self._progress:
            await self._progress.wait_for(lambda: len(self.report.accepted) >= count)

    async def _worker(self, session: aiohttp.ClientSession, index: int) -> None:
        sent = 0
        while not self._stop.is_set():
            event_type = EVENT_TYPES[(index + sent) % len(EVENT_TYPES)]
            await self.deliver(session, new_webhook_id(), sample_body(event_type))
            sent += 1

    async def deliver(self, session: aiohttp.ClientSession, webhook_id: str, body: bytes) -> None:
        deadline = time.monotonic() + self.retry_deadline
        backoff = 0.05
        while time.monotonic() < deadline and not self._abandon.is_set():
            headers = self.signer.headers(body, webhook_id=webhook_id)
            sent = time.monotonic()
            try:
                async with session.post(self.url, data=body, headers=headers) as response:
                    await response.read()
                    self.report.statuses[response.status] += 1
                    if 200 <= response.status < 300:
                        async with self._progress:
                            self.report.accepted.add(webhook_id)
                            self.report.accepted_attempts.append((sent, time.monotonic()))
                            self.report.accepted_bodies[webhook_id] = (time.monotonic(), body)
                            self._progress.notify_all()
                        return
            except (aiohttp.ClientError, TimeoutError):
                self.report.connection_errors += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)
        self.report.given_up.add(webhook_id)


@pytest.fixture
async def make_sender() -> AsyncIterator[Callable[..., OpenAILikeSender]]:
    """Senders that are always stopped, even when a test fails halfway."""
    senders: list[OpenAILikeSender] = []

    def make(url: str, signer: Signer, **options: Any) -> OpenAILikeSender:
        sender = OpenAILikeSender(url, signer, **options)
        senders.append(sender)
        return sender

    yield make
    for sender in senders:
        if sender._task is not None and not sender._task.done():
            await sender.finish(abandon=True)
