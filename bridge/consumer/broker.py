"""What every reader of the bridge's events shares: where the broker is, how to reach one
of its nodes (over TLS with a chosen CA), the exchange and binding patterns, and closing."""

from __future__ import annotations

import contextlib
import random
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
from pamqp.common import Arguments
from pydantic import SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from yarl import URL

from bridge.nodes import BrokerNodes, first_answering, parse_node_urls, within
from bridge.settings import (
    DEFAULT_EXCHANGE,
    ENV_PREFIX,
    LogFormat,
    LogLevel,
    bridge_setting,
    default_secrets_dir,
    settings_error,
)

CONNECTION_NAME = "openai-webhook-bridge consumer"
ConnectionT = TypeVar("ConnectionT")


class ExchangeNotFoundError(Exception):
    """The exchange to bind to does not exist (the bridge declares it when it starts)."""

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange
        super().__init__(f"exchange {exchange!r} does not exist")


class ConsumerSettings(BaseSettings):
    """Where the bridge publishes, read from its own ``BRIDGE_*`` variables and secret files.

    Unlike :class:`bridge.settings.Settings`, it needs no webhook secret: consuming
    without re-verifying signatures does not involve one.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore", hide_input_in_errors=True
    )

    amqp_url: SecretStr = bridge_setting("amqp_url")
    amqp_heartbeat: int = bridge_setting("amqp_heartbeat")
    amqp_ca_file: Path | None = bridge_setting("amqp_ca_file")
    exchange: str = DEFAULT_EXCHANGE
    log_level: LogLevel = "INFO"
    log_format: LogFormat = bridge_setting("log_format")

    @field_validator("amqp_url")
    @classmethod
    def _node_urls(cls, value: SecretStr) -> SecretStr:
        parse_node_urls(value.get_secret_value())
        return value

    @classmethod
    def load(cls, **overrides: Any) -> ConsumerSettings:
        """Read ``overrides``, then the environment, then ``$BRIDGE_SECRETS_DIR`` files."""
        secrets_dir = default_secrets_dir()
        try:
            return cls(_secrets_dir=secrets_dir if secrets_dir.is_dir() else None, **overrides)
        except ValidationError as error:
            raise settings_error(error) from None


def tls_context(url: str, ca_file: str | Path | None) -> ssl.SSLContext | None:
    """The TLS context for an ``amqps://`` node (``None`` for ``amqp://``): the system's CAs,
    or only those of ``ca_file`` (``BRIDGE_AMQP_CA_FILE``), as the bridge itself connects."""
    if URL(url).scheme != "amqps":
        return None
    return ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))


async def connect_to_a_node(
    amqp_url: str,
    connect: Callable[..., Awaitable[ConnectionT]],
    *,
    attempt_seconds: float,
    ca_file: str | Path | None = None,
) -> ConnectionT:
    """Connect to the first node of ``amqp_url`` (one URL, or a cluster's comma-separated
    list, as ``BRIDGE_AMQP_URL`` takes them) that answers, in this process's order (see
    :class:`bridge.nodes.BrokerNodes`); raise ConnectionError if none does."""
    nodes = BrokerNodes(parse_node_urls(amqp_url), random.Random())  # noqa: S311

    def attempt(url: URL) -> Awaitable[ConnectionT]:
        return connect(
            str(url),
            ssl_context=tls_context(str(url), ca_file),
            client_properties={"connection_name": CONNECTION_NAME},
            timeout=attempt_seconds,
        )

    _, connection = await first_answering(nodes, attempt, attempt_seconds=attempt_seconds)
    return connection


class PatternReader:
    """What every reader of the bridge's events shares: the exchange and binding patterns."""

    def __init__(self, exchange: str, patterns: Sequence[str]) -> None:
        if isinstance(patterns, str) or not patterns:
            raise ValueError("patterns must be a non-empty list of binding patterns")
        self._exchange = exchange
        self._patterns = tuple(patterns)

    @property
    def exchange(self) -> str:
        return self._exchange

    @property
    def patterns(self) -> tuple[str, ...]:
        return self._patterns

    async def _declare_bound_queue(
        self, channel: AbstractChannel, name: str | None, arguments: Arguments
    ) -> AbstractQueue:
        """A named queue is durable and shared; an unnamed one, this reader's own until it
        disconnects. Either is bound to the exchange with every pattern."""
        named = name is not None
        queue = await channel.declare_queue(
            name,
            durable=named,
            exclusive=not named,
            auto_delete=not named,
            arguments=arguments,
        )
        for pattern in self._patterns:
            await queue.bind(self._exchange, routing_key=pattern)
        return queue


def check_queue_options(queue: str | None, *, prefetch: int, quorum: bool) -> None:
    if prefetch < 1:
        raise ValueError("prefetch must be at least 1")
    if quorum and not queue:
        raise ValueError("a quorum queue needs a name: quorum queues are durable and shared")


async def require_exchange(connection: AbstractConnection, name: str) -> None:
    # A failed passive declare closes its channel, so it gets one of its own.
    async with connection.channel() as probe:
        try:
            await probe.declare_exchange(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise ExchangeNotFoundError(name) from None


async def close_deliveries(
    stream: AsyncGenerator[object, None] | None,
    connection: AbstractConnection | None,
    close_timeout: float,
) -> None:
    """End a consumer's delivery stream, then its connection (which returns, or for a
    stream forgets, every unacknowledged message)."""
    try:
        if stream is not None:
            with contextlib.suppress(TimeoutError):
                await within(close_timeout, stream.aclose())
    finally:
        if connection is not None:
            # Towards a frozen node a close never completes: it is abandoned, not awaited.
            with contextlib.suppress(TimeoutError, ConnectionError):
                await within(close_timeout, connection.close())


__all__ = [
    "CONNECTION_NAME",
    "ConsumerSettings",
    "ExchangeNotFoundError",
    "PatternReader",
    "check_queue_options",
    "close_deliveries",
    "connect_to_a_node",
    "require_exchange",
    "tls_context",
]
