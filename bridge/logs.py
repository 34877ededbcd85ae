"""The one place that configures log output: JSON lines off a terminal, readable text on one;
and a rate limit for lines whose number others decide."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Hashable, Iterable
from datetime import UTC, datetime
from typing import Any, Generic, TextIO, TypeVar

Kind = TypeVar("Kind", bound=Hashable)

_STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD_ATTRIBUTES}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
            **_extra_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{key}={value}" for key, value in _extra_fields(record).items())
        line = super().format(record)
        return f"{line} {extras}" if extras else line


def configure_logging(level: str, log_format: str, stream: TextIO | None = None) -> None:
    """Send all logs to ``stream`` (stderr) in the chosen format; ``auto`` picks by terminal."""
    output = stream or sys.stderr
    use_json = log_format == "json" or (log_format == "auto" and not output.isatty())
    handler = logging.StreamHandler(output)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aio-pika/aiormq log reconnect chatter (and frame details at DEBUG) we already summarise.
    for noisy in ("aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.ERROR))


class _Bucket:
    __slots__ = ("suppressed", "suppressed_since", "tokens", "updated")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.updated = now
        self.suppressed = 0
        self.suppressed_since = now


class RateLimitedLog(Generic[Kind]):
    """At most ``rate`` lines a second of each kind, in bursts of up to ``burst`` (a token
    bucket per kind), for lines that whoever sends requests can multiply. ``what`` names
    the lines and ``kind_field`` the field that holds the kind, in the summaries.

    The caller asks :meth:`allow` before building a line, so a line held back costs a few
    float operations. Each one held back is handed to ``on_suppressed`` (a counter), and
    :meth:`report_suppressed` logs one summary per kind, at most every ``summary_seconds``:
    ``suppressed 1234 rejected-request log lines (unauthorized) in the last 10 s``.
    """

    def __init__(
        self,
        logger: logging.Logger,
        kinds: Iterable[Kind],
        *,
        what: str,
        kind_field: str,
        rate: float,
        burst: int,
        summary_seconds: float,
        on_suppressed: Callable[[Kind], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._what = what
        self._kind_field = kind_field
        self._rate = rate
        self._burst = float(burst)
        self._summary_seconds = summary_seconds
        self._on_suppressed = on_suppressed
        self._clock = clock
        now = clock()
        self._buckets = {kind: _Bucket(self._burst, now) for kind in kinds}

    def allow(self, kind: Kind) -> bool:
        """Whether a line of ``kind`` may be logged now; if not, it is counted."""
        bucket = self._buckets[kind]
        now = self._clock()
        tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
        bucket.updated = now
        if tokens >= 1.0:
            bucket.tokens = tokens - 1.0
            return True
        bucket.tokens = tokens
        if not bucket.suppressed:
            bucket.suppressed_since = now
        bucket.suppressed += 1
        self._on_suppressed(kind)
        return False

    def report_suppressed(self, *, due_only: bool = True) -> None:
        """Log how many lines of each kind were held back since its last summary, for each
        kind whose summary is due (``summary_seconds`` after the first one held back), or
        for every kind with ``due_only=False`` (at shutdown)."""
        now = self._clock()
        for kind, bucket in self._buckets.items():
            elapsed = now - bucket.suppressed_since
            if not bucket.suppressed or (due_only and elapsed < self._summary_seconds):
                continue
            self._logger.warning(
                "suppressed %d %s log lines (%s) in the last %.0f s",
                bucket.suppressed,
                self._what,
                kind,
                elapsed,
                extra={self._kind_field: str(kind), "suppressed": bucket.suppressed},
            )
            bucket.suppressed = 0
