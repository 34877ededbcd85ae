"""The nodes of one RabbitMQ cluster, and reaching one of them: what the bridge's publisher
and the consumers both use to stay connected while nodes come and go.

Each process shuffles the node list once, so that processes spread over the nodes; after
losing a node it tries the following one first and the lost one last. Every attempt is
bounded, connections carry a heartbeat (a frozen node is given up after
(heartbeat + 1) x 3 seconds), and rounds of attempts are spaced by exponential backoff
with jitter, so that processes that lost the same node do not all come back at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from yarl import URL

RETRY_INTERVAL = 0.5
MAX_RETRY_INTERVAL = 5.0
T = TypeVar("T")


class BrokerNodes:
    """The nodes of one cluster in this process's own order, and which to try next.

    The order is shuffled once, so that pods spread over the nodes. After losing a node,
    the next round starts with the node after it and tries the lost one last.
    """

    def __init__(self, urls: Sequence[URL], rng: random.Random) -> None:
        self._urls = list(urls)
        rng.shuffle(self._urls)
        self._next = 0
        self._current: URL | None = None
        self._connections = 0

    @property
    def current(self) -> str | None:
        return None if self._current is None else node_address(self._current)

    def round(self) -> list[URL]:
        return self._urls[self._next :] + self._urls[: self._next]

    def connected_to(self, url: URL) -> bool:
        """Record a new connection; true if it replaces an earlier one (a reconnect)."""
        self._current = url
        self._next = self._urls.index(url)
        self._connections += 1
        return self._connections > 1

    def lost_current(self) -> None:
        if self._current is not None:
            self._next = (self._urls.index(self._current) + 1) % len(self._urls)


def parse_node_urls(text: str) -> tuple[URL, ...]:
    """The URLs of a comma-separated list (``BRIDGE_AMQP_URL``); raises ValueError naming
    the first one that is not an ``amqp://`` or ``amqps://`` URL with a host."""
    urls = []
    for position, part in enumerate(text.split(","), start=1):
        url = URL(part.strip())
        if url.scheme not in ("amqp", "amqps") or not url.host:
            raise ValueError(f"URL #{position} must be an amqp:// or amqps:// URL with a host")
        urls.append(url)
    return tuple(urls)


def node_address(url: URL) -> str:
    """``host:port`` of a node: what logs and metrics name it by, never with credentials."""
    port = url.port or (5671 if url.scheme == "amqps" else 5672)
    return f"{url.host}:{port}"


def with_heartbeat(url: URL, heartbeat: int) -> URL:
    """``url`` asking the node for ``heartbeat``-second heartbeats."""
    return url.update_query(heartbeat=str(heartbeat))


async def first_answering(
    nodes: BrokerNodes, connect: Callable[[URL], Awaitable[T]], *, attempt_seconds: float
) -> tuple[URL, T]:
    """Connect to the first node of this round that answers within ``attempt_seconds``,
    recording it in ``nodes``; raise ConnectionError naming every node's problem if none
    does."""
    problems = []
    for url in nodes.round():
        try:
            connection = await within(attempt_seconds, connect(url))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # this node is down: try the next one
            problems.append(f"{node_address(url)}: {describe(error)}")
            continue
        return url, connection
    raise ConnectionError("no broker node answered: " + "; ".join(problems))


def backoff(failures: int, rng: random.Random) -> float:
    """Exponential backoff with jitter, bounded by ``MAX_RETRY_INTERVAL``."""
    ceiling = min(RETRY_INTERVAL * 2 ** (failures - 1), MAX_RETRY_INTERVAL)
    return rng.uniform(ceiling / 2, ceiling)


async def within(seconds: float, work: Awaitable[T]) -> T:
    """Await ``work`` for at most ``seconds``, then abandon it (cancelled, not
    awaited): towards a frozen node, aio-pika's channel close ignores cancellation, so an
    ``asyncio.timeout`` around it would not end the wait."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        task.add_done_callback(retrieve_outcome)
        raise TimeoutError
    if task.cancelled():
        # aiormq cancels the calls pending on a connection it closes; that is not the
        # caller being cancelled, and must not end the caller.
        raise ConnectionError("the connection closed during the call")
    return task.result()


def retrieve_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
