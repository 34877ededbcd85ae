"""URLs as they may be logged: any password hidden."""

from __future__ import annotations

from yarl import URL

__all__ = ["redact_url"]

_SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pass", "username", "user"})


def redact_url(url: URL) -> str:
    """The URL as it may be logged: a password, whether in the authority or as a query
    argument (redis-py takes ``?password=``), replaced by ``***``."""
    if url.password:
        url = url.with_password("***")
    hidden = {key: "***" for key in url.query if key.lower() in _SECRET_QUERY_KEYS}
    return str(url.update_query(hidden) if hidden else url)
