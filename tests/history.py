"""The history of a fault test, and the one check every fault test makes of it.

A sender that behaves like OpenAI's (it retries every non-2xx and connection error, with
the same ``webhook-id`` and body) records every attempt it makes: the id, when it was
sent, its status or connection error, when it was answered. After the fault is healed the
test reads everything that arrived (the ids in a queue, or the ids a consumer's handler
saw, one entry per copy) and :func:`check` compares the two: a 2xx'd id that never
arrived is lost, an id that arrived more than once is duplicated, a status other than 2xx
or 503 breaks the bridge's contract. It prints one summary line per scenario, so that runs
can be compared, and fails on any loss or unexpected status.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
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


@dataclass(frozen=True, slots=True)
class Attempt:
    """One POST of one event: ``status`` is None when the connection failed instead."""

    webhook_id: str
    sent: float
    answered: float
    status: int | None

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass
class History:
    """Every attempt a sender made (monotonic times), and the events it gave up on."""

    attempts: list[Attempt] = field(default_factory=list)
    accepted: set[str] = field(default_factory=set)
    given_up: set[str] = field(default_factory=set)
    bodies: dict[str, bytes] = field(default_factory=dict)
    """The body of each event that got a 2xx: to deliver it again, as OpenAI would."""

    def record(self, attempt: Attempt) -> None:
        self.attempts.append(attempt)
        if attempt.accepted:
            self.accepted.add(attempt.webhook_id)

    @property
    def statuses(self) -> Counter[int]:
        return Counter(a.status for a in self.attempts if a.status is not None)

    @property
    def connection_errors(self) -> int:
        return sum(1 for attempt in self.attempts if attempt.status is None)

    def accepted_sent_after(self, moment: float) -> list[Attempt]:
        return [a for a in self.attempts if a.accepted and a.sent > moment]

    def first_2xx_sent_after(self, moment: float) -> float:
        """Seconds from ``moment`` to the answer of the first 2xx'd attempt sent after it."""
        answered = [attempt.answered for attempt in self.accepted_sent_after(moment)]
        assert answered, "no request sent after that moment got a 2xx"
        return min(answered) - moment

    def accepted_answered_between(self, start: float, end: float) -> list[str]:
        """The ids whose 2xx came between ``start`` and ``end``."""
        return [a.webhook_id for a in self.attempts if a.accepted and start <= a.answered <= end]

    def longest_gap_after(self, moment: float) -> float:
        """The longest wait for a 2xx from ``moment`` on: until the first, or between two
        successive ones."""
        answered = sorted(a.answered for a in self.attempts if a.accepted and a.answered >= moment)
        return max((b - a for a, b in itertools.pairwise([moment, *answered])), default=0.0)

    def longest_gap(self) -> float:
        """The longest time, from the first attempt on, in which no attempt got a 2xx."""
        if not self.attempts:
            return 0.0
        moments = sorted(attempt.answered for attempt in self.attempts if attempt.accepted)
        start = min(attempt.sent for attempt in self.attempts)
        end = max(attempt.answered for attempt in self.attempts)
        edges = [start, *moments, end]
        return max(later - earlier for earlier, later in itertools.pairwise(edges))


@dataclass(frozen=True)
class Verdict:
    """What :func:`check` found; ``summary`` is the line each scenario prints."""

    scenario: str
    sent: int
    accepted: int
    unavailable: int
    connection_errors: int
    unexpected: dict[int, int]
    lost: frozenset[str]
    duplicates: int
    given_up: int
    longest_gap: float

    @property
    def summary(self) -> str:
        return (
            f"{self.scenario}: sent {self.sent}, 2xx {self.accepted}, "
            f"503 {self.unavailable}, connection errors {self.connection_errors}, "
            f"lost {len(self.lost)}, duplicates {self.duplicates}, "
            f"given up {self.given_up}, longest gap {self.longest_gap:.1f} s"
            + (f", unexpected statuses {self.unexpected}" if self.unexpected else "")
        )


def check(
    scenario: str, history: History, arrived: Iterable[str], *, abandoned: bool = False
) -> Verdict:
    """Compare what the sender was told with what arrived: one id per copy, a queue's
    message ids or the ids a consumer's handler saw (other senders' ids are ignored).

    Prints the summary line; fails on any loss, any status other than 2xx and 503, or,
    unless the test ``abandoned`` the sender, any event it gave up on."""
    sent = {attempt.webhook_id for attempt in history.attempts}
    copies = Counter(webhook_id for webhook_id in arrived if webhook_id in sent)
    statuses = history.statuses
    verdict = Verdict(
        scenario=scenario,
        sent=len(sent),
        accepted=len(history.accepted),
        unavailable=statuses[503],
        connection_errors=history.connection_errors,
        unexpected={
            status: count
            for status, count in sorted(statuses.items())
            if not 200 <= status < 300 and status != 503
        },
        lost=frozenset(history.accepted - copies.keys()),
        duplicates=sum(count - 1 for count in copies.values()),
        given_up=len(history.given_up),
        longest_gap=history.longest_gap(),
    )
    print(f"\nhistory {verdict.summary}")  # pytest -s shows it; -rA too
    assert verdict.accepted, f"the sender got no 2xx at all: {verdict.summary}"
    assert not verdict.lost, f"2xx'd events missing: {sorted(verdict.lost)[:5]} ({verdict.summary})"
    assert not verdict.unexpected, f"statuses other than 2xx and 503: {verdict.summary}"
    if not abandoned:
        assert not verdict.given_up, f"the sender gave up on events: {verdict.summary}"
    return verdict


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
    rate: float | None = None
    """New events per second, all workers together; None: as fast as answers come."""
    history: History = field(default_factory=History)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _abandon: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[History] | None = None
    _progress: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self) -> History:
        """Run until :meth:`stop`; then finish (or give up on) the events already started."""
        timeout = aiohttp.ClientTimeout(total=30)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(
                *(self._worker(session, index) for index in range(self.concurrency))
            )
        return self.history

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def finish(self, *, abandon: bool = False) -> History:
        """Send no new events and wait for the sender; with ``abandon``, stop retrying the
        ones under way too."""
        self._stop.set()
        if abandon:
            self._abandon.set()
        assert self._task is not None, "start() first"
        return await self._task

    async def wait_accepted(self, count: int, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout), self._progress:
            await self._progress.wait_for(lambda: len(self.history.accepted) >= count)

    async def accept_more(self, count: int, timeout: float = 30.0) -> None:
        """Wait for ``count`` more events than now to get a 2xx."""
        await self.wait_accepted(len(self.history.accepted) + count, timeout)

    async def _worker(self, session: aiohttp.ClientSession, index: int) -> None:
        sent = 0
        loop = asyncio.get_running_loop()
        interval = 0.0 if self.rate is None else self.concurrency / self.rate
        next_event = loop.time() + index * interval / self.concurrency
        while not self._stop.is_set():
            await asyncio.sleep(next_event - loop.time())
            event_type = EVENT_TYPES[(index + sent) % len(EVENT_TYPES)]
            await self.deliver(session, new_webhook_id(), sample_body(event_type))
            sent += 1
            next_event = max(next_event + interval, loop.time())

    async def deliver(self, session: aiohttp.ClientSession, webhook_id: str, body: bytes) -> None:
        deadline = time.monotonic() + self.retry_deadline
        backoff = 0.05
        while time.monotonic() < deadline and not self._abandon.is_set():
            headers = self.signer.headers(body, webhook_id=webhook_id)
            sent = time.monotonic()
            status: int | None = None
            try:
                async with session.post(self.url, data=body, headers=headers) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                pass
            attempt = Attempt(webhook_id, sent, time.monotonic(), status)
            async with self._progress:
                if attempt.accepted:
                    self.history.bodies[webhook_id] = body
                self.history.record(attempt)
                self._progress.notify_all()
            if attempt.accepted:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)
        self.history.given_up.add(webhook_id)


@pytest.fixture
def scenario(request: pytest.FixtureRequest) -> str:
    """The name a test's summary line goes by: the test's own, parameters included."""
    return str(request.node.name)


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
