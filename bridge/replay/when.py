"""``--since`` / ``--until`` values: a duration back from now, or an ISO 8601 time."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"([0-9]{1,9})([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def parse_when(text: str, now: datetime) -> datetime:
    """``10m``, ``2h``, ``7d``, ``1w`` before ``now``, or an ISO 8601 time (UTC if it
    names no zone). Raises ``ValueError`` with a message fit for the command line."""
    duration = _DURATION.fullmatch(text.strip())
    if duration is not None:
        amount, unit = duration.groups()
        return now - timedelta(seconds=int(amount) * _UNIT_SECONDS[unit])
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"expected a duration such as 10m, 2h or 7d, or an ISO 8601 time, got {text!r}"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
