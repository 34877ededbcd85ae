"""Where the shared Redis is: one URL, parsed once, for the bridge and the consumer library.

Three forms, each with an optional ``user:password@`` (or ``:password@``):

- ``redis://host:port/db`` or ``rediss://...`` (TLS): one Redis, redis-py's own URL
  (its query arguments included);
- ``redis+sentinel://host:port[,host:port...]/service_name[/db]``: the Sentinels, then the
  name of the master they monitor; the credentials are the master's (the Sentinels are
  asked without any);
- ``redis+cluster://host:port[,host:port...]``: seed nodes of a Redis Cluster.

Parsing needs no Redis client, so settings can refuse a malformed URL in one line
whether or not the ``redis`` extra is installed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from urllib.parse import unquote

from yarl import URL

from bridge.urls import redact_url

__all__ = ["RedisKind", "RedisLocation", "parse_redis_url"]

_DEFAULT_PORT = 6379
_DEFAULT_SENTINEL_PORT = 26379


class RedisKind(enum.Enum):
    SINGLE = "single"
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


@dataclass(frozen=True)
class RedisLocation:
    kind: RedisKind
    url: str
    """The URL as given (secret: it may hold a password)."""
    hosts: tuple[tuple[str, int], ...] = ()
    """Sentinels or seed nodes; empty for a single Redis (redis-py reads ``url``)."""
    service_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None

    @property
    def redacted(self) -> str:
        """The URL as it may be logged: any password replaced by ``***``."""
        return redact_redis_url(self.url)


_SCHEMES = {
    "redis": RedisKind.SINGLE,
    "rediss": RedisKind.SINGLE,
    "redis+sentinel": RedisKind.SENTINEL,
    "redis+cluster": RedisKind.CLUSTER,
}


def parse_redis_url(text: str) -> RedisLocation:
    """The location ``text`` names; raises :class:`ValueError` with one line saying what to fix
    (never the password)."""
    scheme, separator, rest = text.partition("://")
    kind = _SCHEMES.get(scheme.lower()) if separator else None
    if kind is None:
        raise ValueError(
            "must be a redis://, rediss://, redis+sentinel:// or redis+cluster:// URL, or empty"
        )
    if kind is RedisKind.SINGLE:
        if not URL(text).host:
            raise ValueError(f"must name a host: {scheme}://[[user]:password@]host:port/db")
        return RedisLocation(kind, text)
    if "?" in rest:
        raise ValueError(
            f"{scheme}:// takes no query arguments (TLS and other options: one Redis, rediss://)"
        )
    authority, _, path = rest.partition("/")
    credentials, at, host_list = authority.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    default_port = _DEFAULT_SENTINEL_PORT if kind is RedisKind.SENTINEL else _DEFAULT_PORT
    hosts = tuple(_host_and_port(part, default_port) for part in host_list.split(","))
    location = RedisLocation(kind, text, hosts, username=username, password=password)
    if kind is RedisKind.CLUSTER:
        if path.strip("/"):
            raise ValueError(
                "redis+cluster:// takes seed nodes only (a cluster has database 0 only): "
                "redis+cluster://[[user]:password@]host:port[,host:port...]"
            )
        return location
    service_name, _, db_text = path.partition("/")
    if not service_name or (not db_text.strip("/").isdigit() and db_text.strip("/")):
        raise ValueError(
            "must name the monitored master, and a database number if any: "
            "redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]"
        )
    db = int(db_text.strip("/") or 0)
    return RedisLocation(kind, text, hosts, unquote(service_name), db, username, password)


def _host_and_port(part: str, default_port: int) -> tuple[str, int]:
    host, colon, port = part.strip().rpartition(":") if "]" not in part else _bracketed(part)
    if not colon:
        host, port = part.strip(), str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"every node must be host:port, got {part.strip()!r}")
    return host.strip("[]"), int(port)


def _bracketed(part: str) -> tuple[str, str, str]:
    """``[::1]:26379`` (an IPv6 address) split at the colon after the bracket."""
    host, _, after = part.strip().partition("]")
    port = after.removeprefix(":")
    return host + "]", ":" if port else "", port


def redact_redis_url(text: str) -> str:
    """``text`` with the password between ``://`` and ``@`` (and in ``?password=``) hidden."""
    scheme, separator, rest = text.partition("://")
    if not separator:
        return text
    authority, slash, path = rest.partition("/")
    credentials, at, hosts = authority.rpartition("@")
    if at:
        user, colon, _secret = credentials.partition(":")
        authority = f"{user}:***@{hosts}" if colon else f"{user}@{hosts}"
    redacted = f"{scheme}://{authority}{slash}{path}"
    return redact_url(URL(redacted)) if "?" in path else redacted
