"""What fetching an object answers, whichever client makes the call."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from bridge.hydrate.mapping import Hydration

__all__ = [
    "ApiAnswer",
    "ApiFailure",
    "FailureKind",
    "Fetcher",
    "KeyLookup",
    "UnknownSource",
    "retry_after_seconds",
]


class FailureKind:
    """How a call failed, in the words the worker acts on."""

    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    UNAUTHORIZED = "unauthorized"
    REFUSED = "refused"
    """Any other 4xx: the request itself was refused (e.g. a malformed id)."""
    UNKNOWN_SOURCE = "unknown_source"
    """No API key for the event's source: no call was made."""


@dataclass(frozen=True, slots=True)
class ApiAnswer:
    """A 2xx: the object's exact bytes."""

    body: bytes
    status: int


class UnknownSource(Exception):
    """Events of a source the worker has no API key for."""

    def __init__(self, source: str | None) -> None:
        self.source = source
        super().__init__(
            "events without a source need OPENAI_API_KEY"
            if source is None
            else f"source {source!r} is not in the worker's BRIDGE_SOURCES"
        )


class ApiFailure(Exception):
    """A call that returned no object: ``kind`` says why, ``status`` is the HTTP status
    (0 without an answer), ``retry_after`` the seconds a 429 asked to wait."""

    def __init__(
        self, kind: str, status: int, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after


class Fetcher(Protocol):
    """Fetches the object of one event (with the API key of its ``source``, if any)."""

    async def fetch(self, hydration: Hydration, object_id: str, source: str | None) -> ApiAnswer:
        """The object's bytes, or raise :class:`ApiFailure`."""
        ...

    async def close(self) -> None: ...


KeyLookup = Callable[[str | None], str]
"""The API key for the events of a source (``x-webhook-source``; ``None``: no source)."""


def retry_after_seconds(
    headers: Mapping[str, str], clock: Callable[[], float] = time.time
) -> float | None:
    """What ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date) asks for."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - clock())
