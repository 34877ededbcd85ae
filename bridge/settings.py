"""All configuration, read once at start-up from ``BRIDGE_*`` variables and secret files."""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from yarl import URL

from bridge.extras import installed
from bridge.nodes import parse_node_urls
from bridge.redis_url import RedisLocation, parse_redis_url
from bridge.signature import decode_secret_list
from bridge.sources import SourceError, SourceSecrets, load_source_secrets, parse_source_names
from bridge.urls import redact_url as redact_url  # where the rest of the package takes it from

ENV_PREFIX = "BRIDGE_"
SECRETS_DIR_VARIABLE = f"{ENV_PREFIX}SECRETS_DIR"
DEFAULT_SECRETS_DIR = Path("/run/secrets/webhook-bridge")
DEFAULT_EXCHANGE = "openai.webhooks"
DEDUP_WINDOW_WITH_REDIS = 73 * 3600.0
SHOWN_DEFAULT = "shown_default"
"""What the reference shows as a setting's default when its own default says too little."""


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_upper)]
LogFormat = Literal["auto", "json", "text"]
QueueType = Literal["quorum", "classic"]
Seconds = Annotated[float, Field(gt=0)]


def _source_names(value: Any) -> Any:
    return parse_source_names(value) if isinstance(value, str) else value


SourceNames = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_source_names)]

# RabbitMQ's x-max-age: a positive count of years, months, days, hours, minutes or seconds.
_ARCHIVE_MAX_AGE = re.compile(r"[1-9][0-9]{0,8}[YMDhms]")


def _empty_is_none(value: Any) -> Any:
    return None if value == "" else value


class SettingsError(Exception):
    """Configuration that must stop the process, as one line naming the setting."""


BROKER_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""RabbitMQ 4's default ``max_message_size`` (3.x: 128 MiB): the largest body a node with
the default configuration accepts, and so the largest ``BRIDGE_MAX_BODY_BYTES``."""

AmqpHeartbeat = Annotated[int, Field(ge=1, le=600)]
"""Seconds between AMQP heartbeats (``BRIDGE_AMQP_HEARTBEAT``), for publishers and consumers."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="ignore",
        validate_default=True,
        hide_input_in_errors=True,
    )

    webhook_secret: Annotated[SecretStr, NoDecode] = Field(
        default=SecretStr(""),
        json_schema_extra={SHOWN_DEFAULT: "(required)"},
        description="One or more whsec_ secrets, comma-separated; any one matching passes. "
        "Required without BRIDGE_SOURCES; with it, each source has its own "
        "(BRIDGE_WEBHOOK_SECRET_<NAME>, or the file <name>/BRIDGE_WEBHOOK_SECRET in "
        "BRIDGE_SECRETS_DIR).",
    )
    sources: SourceNames = Field(
        default=(),
        description="Comma-separated names of the OpenAI projects served, each at "
        "/webhooks/openai/<name> with its own secrets, its messages labelled with the "
        "x-webhook-source header and also routed to the exchange <exchange>.source.<name>; "
        "empty: one project at /webhooks/openai.",
    )
    secrets_poll_interval: Annotated[float, Field(ge=0, le=3600)] = Field(
        default=2.0,
        description="Seconds between checks of the secrets file for new webhook secrets; "
        "0 checks only on SIGHUP.",
    )
    amqp_url: SecretStr = Field(
        default=SecretStr("amqp://guest:guest@localhost:5672/"),
        description="One AMQP URL, or several (comma-separated) nodes of one cluster.",
    )
    amqp_ca_file: Path | None = Field(
        default=None,
        description="CA bundle to verify the broker's certificate with amqps://; "
        "unset: the system's CAs.",
    )
    amqp_heartbeat: AmqpHeartbeat = Field(
        default=10,
        description="AMQP heartbeat in seconds: a node silent for (heartbeat + 1) x 3 seconds "
        "is given up and the bridge moves to another node.",
    )
    queue_type: QueueType = Field(
        default="quorum",
        description="Type of the unrouted and quarantine queues the bridge declares.",
    )
    exchange: Annotated[str, Field(min_length=1, max_length=200)] = Field(
        default=DEFAULT_EXCHANGE,
        description="The topic exchange events are published to, routed by event type.",
    )
    quarantine_exchange: str = Field(
        default="",
        description="The quarantine exchange and its queue; empty: <exchange>.quarantine.",
    )
    unrouted_exchange: str = Field(
        default="",
        description="The alternate exchange and its queue, for events no queue is bound to; "
        "empty: <exchange>.unrouted.",
    )
    declare_topology: bool = Field(
        default=True,
        description="Declare the exchanges and queues at start-up; false: only check that "
        "they exist (topology from broker definitions).",
    )
    archive_max_age: str = Field(
        default="",
        description="Keep an archive stream of every accepted event for this long "
        "(RabbitMQ's x-max-age, e.g. 7D, 12h); empty: no age limit.",
    )
    archive_max_bytes: Annotated[
        Annotated[int, Field(ge=1)] | None, BeforeValidator(_empty_is_none)
    ] = Field(
        default=None,
        description="Keep at most this many bytes in the archive stream; empty: no size limit. "
        "With neither archive setting there is no archive.",
    )
    host: str = Field(
        default="0.0.0.0",  # noqa: S104  # a container must listen beyond loopback
        description="The address to listen on.",
    )
    port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=8080,
        description="The port webhooks are received on (and /healthz, /readyz and /metrics "
        "when BRIDGE_METRICS_PORT is 0).",
    )
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=8081,
        description="The port of /healthz, /readyz and /metrics, which the webhook port then "
        "answers 404; 0: serve them on BRIDGE_PORT.",
    )
    timestamp_tolerance: Annotated[int, Field(ge=1, le=86_400)] = Field(
        default=300,
        description="Seconds a webhook-timestamp may differ from now, either way.",
    )
    max_body_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=256 * 1024,
        description="Larger request bodies are answered 413. At most 16 MiB (16777216), "
        "RabbitMQ 4's default max_message_size: a broker with that default refuses any "
        "larger message.",
    )
    max_buffered_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024 * 1024)] = Field(
        default=32 * 1024 * 1024,
        description="The most bytes of request bodies the process holds at once (a declared "
        "Content-Length counts in full from the start); a request that would go over it is "
        "answered 503 at once.",
    )
    publish_timeout: Seconds = Field(
        default=5.0,
        description="Seconds to wait for the broker's confirm before answering 503; also bounds "
        "each connection attempt and topology check.",
    )
    body_timeout: Seconds = Field(
        default=10.0,
        description="Seconds to receive a request body before answering 408.",
    )
    max_publishes_in_flight: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=1024,
        description="The most unconfirmed publishes per process; below it the limit adapts "
        "to the broker's confirm latency.",
    )
    min_publishes_in_flight: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=8,
        description="The fewest unconfirmed publishes the adaptive limit allows; equal to "
        "BRIDGE_MAX_PUBLISHES_IN_FLIGHT, a fixed limit.",
    )
    drain_timeout: Seconds = Field(
        default=20.0,
        description="On SIGTERM, seconds to let in-flight requests finish.",
    )
    retry_after: Annotated[int, Field(ge=1)] = Field(
        default=5,
        description="The Retry-After seconds on a 503.",
    )
    dedup_url: SecretStr = Field(
        default=SecretStr(""),
        description="The Redis shared by all pods: redis:// or rediss:// (one Redis), "
        "redis+sentinel://host:port[,host:port...]/service_name[/db] (Sentinels and the "
        "master's name), redis+cluster://host:port[,host:port...] (Cluster seed nodes); "
        "empty: deduplicate in this process only.",
    )
    dedup_window: Annotated[
        Annotated[float, Field(ge=0)] | None, BeforeValidator(_empty_is_none)
    ] = Field(
        default=None,
        description="Seconds a confirmed webhook-id is remembered; default 600 in process, "
        f"{DEDUP_WINDOW_WITH_REDIS:g} (OpenAI's 72 h of retries plus 1 h) with Redis.",
    )
    dedup_max_ids: Annotated[int, Field(ge=0)] = Field(
        default=100_000,
        description="At most this many ids remembered per process (in-process store only); "
        "when full, the oldest eighth is forgotten.",
    )
    dedup_on_error: Literal["publish", "reject"] = Field(
        default="publish",
        description="While Redis is unreachable: publish without the duplicate check, or "
        "reject with 503 (and /readyz 503).",
    )
    dedup_timeout: Annotated[float, Field(gt=0, le=10)] = Field(
        default=0.2,
        description="Seconds each Redis round trip may take before Redis counts as down.",
    )
    dedup_key_prefix: str = Field(
        default="",
        description="Prefix of the Redis keys; empty: webhook-bridge:<exchange>:.",
    )
    workers: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1, description="Processes sharing the port."
    )
    log_level: LogLevel = Field(default="INFO", description="The lowest level logged.")
    log_format: LogFormat = Field(
        default="auto",
        description="json (one object per line), text, or auto: text on a terminal, "
        "JSON otherwise.",
    )

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, value: SecretStr) -> SecretStr:
        _split_amqp_urls(value)
        return value

    @field_validator("max_body_bytes")
    @classmethod
    def _publishable_body(cls, value: int) -> int:
        if value > BROKER_MAX_MESSAGE_BYTES:
            raise ValueError(
                f"must be at most {BROKER_MAX_MESSAGE_BYTES} (16 MiB, RabbitMQ 4's default "
                "max_message_size): the broker would refuse a larger body; lower it"
            )
        return value

    @field_validator("archive_max_age")
    @classmethod
    def _rabbitmq_max_age(cls, value: str) -> str:
        if value and _ARCHIVE_MAX_AGE.fullmatch(value) is None:
            raise ValueError(
                "must be a RabbitMQ x-max-age such as 7D, 12h or 30m "
                "(a positive number and one of Y, M, D, h, m, s)"
            )
        return value

    _source_secrets: tuple[SourceSecrets, ...] = PrivateAttr(default=())

    @field_validator("webhook_secret")
    @classmethod
    def _usable_secrets(cls, value: SecretStr) -> SecretStr:
        # Empty: unset, or set empty, which the check across settings tells apart.
        if value.get_secret_value():
            _decode_secrets(value)
        return value

    @model_validator(mode="after")
    def _one_secret_list_or_sources(self) -> Settings:
        given = "webhook_secret" in self.model_fields_set
        if self.sources and given:
            raise ValueError(
                "BRIDGE_WEBHOOK_SECRET is set with BRIDGE_SOURCES, which reads each source's "
                "secrets as BRIDGE_WEBHOOK_SECRET_<NAME> or <BRIDGE_SECRETS_DIR>/<name>/"
                "BRIDGE_WEBHOOK_SECRET: move it to its source"
            )
        if not self.sources and not given:
            raise ValueError(
                "BRIDGE_WEBHOOK_SECRET is required (or BRIDGE_SOURCES, with secrets per source)"
            )
        if given and not self.webhook_secret.get_secret_value():
            raise ValueError(f"{env_name('webhook_secret')} secret #1 is empty")
        return self

    @model_validator(mode="after")
    def _default_exchange_names(self) -> Settings:
        self.quarantine_exchange = self.quarantine_exchange or f"{self.exchange}.quarantine"
        self.unrouted_exchange = self.unrouted_exchange or f"{self.exchange}.unrouted"
        return self

    @field_validator("dedup_url")
    @classmethod
    def _redis_url(cls, value: SecretStr) -> SecretStr:
        return checked_redis_url(value)

    @field_validator("dedup_window")
    @classmethod
    def _window_with_redis(cls, value: float | None, info: ValidationInfo) -> float | None:
        url = info.data.get("dedup_url")
        if value == 0 and url is not None and url.get_secret_value():
            raise ValueError("must be positive with BRIDGE_DEDUP_URL (or leave it unset)")
        return value

    @model_validator(mode="after")
    def _window_covers_replays(self) -> Settings:
        # A captured webhook passes the timestamp check for 2 x the tolerance (either side
        # of its timestamp): a shorter memory would let it be replayed once forgotten.
        window, covered = self.dedup_window_seconds, 2 * self.timestamp_tolerance
        if 0 < window < covered:
            raise ValueError(
                f"the deduplication window ({window:g} s, BRIDGE_DEDUP_WINDOW) must cover twice "
                f"BRIDGE_TIMESTAMP_TOLERANCE ({covered} s), or a signed webhook could be "
                "replayed after its id is forgotten: raise the window or lower the tolerance"
            )
        return self

    @model_validator(mode="after")
    def _separate_ports(self) -> Settings:
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(
                f"BRIDGE_METRICS_PORT ({self.metrics_port}) is BRIDGE_PORT too: choose "
                "another port, or 0 to serve /healthz, /readyz and /metrics on BRIDGE_PORT"
            )
        return self

    @model_validator(mode="after")
    def _buffer_holds_a_body(self) -> Settings:
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ValueError(
                f"BRIDGE_MAX_BUFFERED_BYTES ({self.max_buffered_bytes}) is below "
                f"BRIDGE_MAX_BODY_BYTES ({self.max_body_bytes}): a body of the largest "
                "size allowed could never be received"
            )
        return self

    @model_validator(mode="after")
    def _in_flight_bounds(self) -> Settings:
        if self.min_publishes_in_flight > self.max_publishes_in_flight:
            raise ValueError(
                f"BRIDGE_MIN_PUBLISHES_IN_FLIGHT ({self.min_publishes_in_flight}) is above "
                f"BRIDGE_MAX_PUBLISHES_IN_FLIGHT ({self.max_publishes_in_flight})"
            )
        return self

    @model_validator(mode="after")
    def _default_dedup_key_prefix(self) -> Settings:
        self.dedup_key_prefix = self.dedup_key_prefix or f"webhook-bridge:{self.exchange}:"
        return self

    @property
    def dedup_window_seconds(self) -> float:
        if self.dedup_window is not None:
            return self.dedup_window
        return DEDUP_WINDOW_WITH_REDIS if self.dedup_url.get_secret_value() else 600.0

    @property
    def dedup_claim_ttl(self) -> float:
        """Seconds a claim outlives a pod that died mid-publish: a little over twice the
        publish timeout, so a live pod's claim never expires before its publish ends."""
        return 2 * self.publish_timeout + 1

    @property
    def dedup_location(self) -> RedisLocation:
        return parse_redis_url(self.dedup_url.get_secret_value())

    @property
    def dedup_url_redacted(self) -> str:
        return self.dedup_location.redacted

    @cached_property
    def signing_keys(self) -> tuple[bytes, ...]:
        """The secrets of the single source (none with ``BRIDGE_SOURCES``)."""
        return () if self.sources else _decode_secrets(self.webhook_secret)

    @property
    def source_secrets(self) -> tuple[SourceSecrets, ...]:
        """Each configured source's secrets, in the order of ``BRIDGE_SOURCES``."""
        return self._source_secrets

    def with_source_secrets(self, secrets_dir: Path, environment: Mapping[str, str]) -> Settings:
        """Read every source's secrets (see :mod:`bridge.sources`); raises SettingsError."""
        try:
            self._source_secrets = load_source_secrets(self.sources, secrets_dir, environment)
        except SourceError as error:
            raise SettingsError(str(error)) from None
        return self

    def source_named(self, name: str) -> SourceSecrets:
        """The source ``--source NAME`` names; raises SettingsError for none."""
        for source in self.source_secrets:
            if source.name == name:
                return source
        configured = ", ".join(self.sources) or "none: BRIDGE_SOURCES is not set"
        raise SettingsError(f"--source {name}: no such source (configured: {configured})")

    def verification_secrets(
        self, extra: Sequence[str] = (), *, source: str | None = None
    ) -> list[str] | dict[str, list[str]]:
        """The secrets to re-check stored messages with: the single list, or each source's
        (``extra``, retired secrets, only for ``source``: never for a source they are not
        known to belong to)."""
        if source is not None:
            self.source_named(source)
        if not self.sources:
            return [*self.webhook_secret.get_secret_value().split(","), *extra]
        if extra and source is None:
            raise SettingsError("with BRIDGE_SOURCES, extra secrets need --source NAME")
        return {
            each.name: [
                *each.secret.get_secret_value().split(","),
                *(extra if each.name == source else ()),
            ]
            for each in self.source_secrets
        }

    @property
    def archive_enabled(self) -> bool:
        return bool(self.archive_max_age) or self.archive_max_bytes is not None

    @cached_property
    def amqp_urls(self) -> tuple[URL, ...]:
        """The broker nodes to connect to, in the configured order."""
        return _split_amqp_urls(self.amqp_url)

    @property
    def amqp_url_redacted(self) -> str:
        return ",".join(redact_url(url) for url in self.amqp_urls)

    def amqp_ssl_context(self, url: URL | None = None) -> ssl.SSLContext | None:
        """TLS context for an ``amqps://`` node (the first one by default): the system CAs,
        or the configured CA bundle."""
        if (url or self.amqp_urls[0]).scheme != "amqps":
            return None
        return ssl.create_default_context(
            cafile=str(self.amqp_ca_file) if self.amqp_ca_file else None
        )


def bridge_setting(name: str) -> Any:
    """The bridge's declaration of setting ``name`` (default, bounds, description), for a
    settings model that reads the same variable with the same meaning."""
    return Settings.model_fields[name]


def checked_redis_url(value: SecretStr) -> SecretStr:
    """A Redis URL setting (redis://, rediss://, redis+sentinel://, redis+cluster://), or
    empty; raises ValueError for a malformed one, or without the Redis client."""
    text = value.get_secret_value()
    if not text:
        return value
    parse_redis_url(text)
    if not installed("redis"):
        raise ValueError("needs the Redis client: pip install 'openai-webhook-bridge[redis]'")
    return value


def _split_amqp_urls(value: SecretStr) -> tuple[URL, ...]:
    return parse_node_urls(value.get_secret_value())


def _decode_secrets(value: SecretStr) -> tuple[bytes, ...]:
    return decode_secret_list(value.get_secret_value())


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def default_secrets_dir() -> Path:
    return Path(os.environ.get(SECRETS_DIR_VARIABLE, DEFAULT_SECRETS_DIR))


def load_settings(secrets_dir: Path | None = None, **overrides: Any) -> Settings:
    """Read ``overrides`` (command-line flags), the environment and secret files, in that
    order of precedence.

    Secret files are read from ``secrets_dir`` (default ``$BRIDGE_SECRETS_DIR`` or
    ``/run/secrets/webhook-bridge``) if it exists: one file per setting, named like its
    variable. Raises :class:`SettingsError` with one line per bad setting, never a value.
    """
    secrets_dir = secrets_dir or default_secrets_dir()
    directory = secrets_dir if secrets_dir.is_dir() else None
    try:
        settings = Settings(_secrets_dir=directory, **overrides)
    except ValidationError as error:
        raise settings_error(error) from None
    return settings.with_source_secrets(secrets_dir, os.environ)


def settings_error(error: ValidationError) -> SettingsError:
    """One line naming each bad setting, never its value."""
    problems = []
    for detail in error.errors(include_url=False, include_input=False):
        message = detail["msg"].removeprefix("Value error, ")
        if detail["type"] == "missing":
            message = "is required"
        # A check across settings names them itself; a variable read by another name
        # than the prefixed field's (OPENAI_API_KEY) is named as it is spelled.
        location = str(detail["loc"][0]) if detail["loc"] else ""
        variable = location if location.isupper() else env_name(location)
        named = f"{variable} " if location else ""
        problems.append(f"{named}{message}")
    return SettingsError("; ".join(problems))
